"""The ternary step of LoTA-QAF in one kernel: from A_T [K, r] and B_T [r, N], tile by tile,
dW = A_T @ B_T (integers in [-r, r]), the markers W_hat = sign(dW) * [|dW| > omega] with the boundary
check read from the packed codes (+1 suppressed at code 2^N - 1, -1 at code 0), and the per-group sums
of dW and of W_hat (int32 atomics: exact and independent of their order). dW never exists as a dense
tensor; the markers leave as 2-bit fields (lotaqaf_kernels.marker_words' layout) and are turned into
sparse entries only when some fired. R's group sum is then sum(dW) - omega * sum(W_hat).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _ternary_kernel(a_ptr, b_ptr, q_ptr, g_ptr, words_ptr, sdw_ptr, swh_ptr, cnt_ptr, K, N, R, omega,
                    BITS: tl.constexpr, PC: tl.constexpr, PW: tl.constexpr, USE_MARKERS: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    k_ok = offs_k < K
    n_ok = offs_n < N
    ok2 = k_ok[:, None] & n_ok[None, :]
    a = tl.load(a_ptr + offs_k[:, None] * R + offs_r[None, :], mask=k_ok[:, None] & (offs_r[None, :] < R), other=0.0)
    b = tl.load(b_ptr + offs_r[:, None] * N + offs_n[None, :], mask=(offs_r[:, None] < R) & n_ok[None, :], other=0.0)
    dw = tl.dot(a.to(tl.float16), b.to(tl.float16))  # -1/0/1 are exact in fp16; fp32 sums of integers are exact
    dw = tl.where(ok2, dw, 0.0)
    if USE_MARKERS:
        mask = (1 << BITS) - 1
        pos = (offs_k % PC) * BITS
        word = (offs_k // PC) * PW + pos // 32
        shift = pos % 32
        lo = tl.load(q_ptr + word[:, None] * N + offs_n[None, :], mask=ok2, other=0)
        code = (lo >> shift[:, None]) & mask
        if BITS == 3:
            low = 32 - shift
            straddle = (shift + BITS) > 32
            hi = tl.load(q_ptr + (word + 1)[:, None] * N + offs_n[None, :], mask=ok2 & straddle[:, None], other=0)
            joined = ((lo >> shift[:, None]) & ((1 << low[:, None]) - 1)) | ((hi << low[:, None]) & mask)
            code = tl.where(straddle[:, None], joined, code)
        up = dw > omega
        down = dw < -omega
        w_hat = tl.where(up & (code < mask), 1, 0) - tl.where(down & (code > 0), 1, 0)
        blocked = tl.where(up & (code == mask), 1, 0) + tl.where(down & (code == 0), 1, 0)
        tl.atomic_add(cnt_ptr, tl.sum(tl.sum(tl.abs(w_hat), axis=1), axis=0))
        tl.atomic_add(cnt_ptr + 1, tl.sum(tl.sum(blocked, axis=1), axis=0))
        fields = (w_hat & 3) << (2 * (offs_k % 16))[:, None]
        packed = tl.reduce(tl.reshape(fields, (BLOCK_K // 16, 16, BLOCK_N)), 1, _or)
        rows16 = pid_k * (BLOCK_K // 16) + tl.arange(0, BLOCK_K // 16)
        tl.store(words_ptr + rows16[:, None] * N + offs_n[None, :], packed,
                 mask=(rows16[:, None] < (K + 15) // 16) & n_ok[None, :])
        g = tl.load(g_ptr + offs_k, mask=k_ok, other=0)
        tl.atomic_add(swh_ptr + g[:, None] * N + offs_n[None, :], w_hat, mask=ok2)
    else:
        g = tl.load(g_ptr + offs_k, mask=k_ok, other=0)
    tl.atomic_add(sdw_ptr + g[:, None] * N + offs_n[None, :], dw.to(tl.int32), mask=ok2)


def ternary_step(A_T, B_T, qweight, bits, g_idx, n_groups, omega, use_markers=True):
    """-> (idx int64, val int8: the sparse markers; r_sums fp32 [G, N]: per-group sums of
    R = dW - omega * W_hat; blocked: 0-d int64, the markers the boundary suppressed)."""
    K, r = A_T.shape
    N = B_T.shape[1]
    dev = A_T.device
    pc = 32 if bits == 3 else 32 // bits
    pw = 3 if bits == 3 else 1
    words = torch.zeros((K + 15) // 16, N, dtype=torch.int32, device=dev)
    sdw = torch.zeros(n_groups, N, dtype=torch.int32, device=dev)
    swh = torch.zeros(n_groups, N, dtype=torch.int32, device=dev)
    cnt = torch.zeros(2, dtype=torch.int32, device=dev)
    bk, bn = 64, 64
    br = max(16, triton.next_power_of_2(r))
    grid = (triton.cdiv(K, bk), triton.cdiv(N, bn))
    _ternary_kernel[grid](A_T.float().contiguous(), B_T.float().contiguous(), qweight.contiguous(),
                          g_idx.to(torch.int32).contiguous(), words, sdw, swh, cnt, K, N, r, float(omega),
                          BITS=bits, PC=pc, PW=pw, USE_MARKERS=bool(use_markers), BLOCK_K=bk, BLOCK_N=bn, BLOCK_R=br)
    r_sums = sdw.float() - float(omega) * swh.float()
    if int(cnt[0]) == 0:  # the usual case at omega ~ 0.75 r: no marker fired (one host sync, like the torch path)
        empty = torch.zeros(0, dtype=torch.int64, device=dev)
        return empty, empty.to(torch.int8), r_sums, cnt[1].long()
    shifts = 2 * torch.arange(16, dtype=torch.int32, device=dev).view(1, 16, 1)
    fields = (words.unsqueeze(1) >> shifts) & 3  # [K/16, 16, N]
    dense = (fields - ((fields & 2) << 1)).view(-1, N)[:K].reshape(-1)
    idx = dense.nonzero().squeeze(1)
    return idx, dense[idx].to(torch.int8), r_sums, cnt[1].long()
