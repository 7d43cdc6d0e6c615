"""Fused dequantize-and-multiply from packed GPTQ words: y = x @ W (+ bias) with
W[k, n] = s[g(k), n] * ((W_int[k, n] + W_hat[k, n]) - z[g(k), n]) and float zero points z.

Codes are packed along the input dim as lotaqaf and GPTQ keep them (quant.py: code k of a column at
stream bits [k*bits, (k+1)*bits) of that column's words; 3-bit codes 10 and 21 of each 32 straddle two
words). g_idx is read per row, so act-order checkpoints run as they are. Optional W_hat comes as 2-bit
fields (lotaqaf_kernels.marker_words): added to the integer codes before the zero point, which is exact,
so an adapter (codes + markers) and its merged layer (codes already moved) give the same bits.

Two tile shapes: few rows (decode: the whole work is streaming the weight, so many narrow programs
over the outputs) and many rows (prefill / training: square-ish tiles for the tensor cores).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _qmm_kernel(x_ptr, q_ptr, s_ptr, z_ptr, g_ptr, m_ptr, b_ptr, y_ptr, M, N, K,
                stride_xm, stride_ym,
                BITS: tl.constexpr, PC: tl.constexpr, PW: tl.constexpr,
                HAS_MARKERS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    mask = (1 << BITS) - 1
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        # where row k's code sits: word (k // PC) * PW + pos // 32, bit pos % 32, pos = (k % PC) * BITS
        pos = (offs_k % PC) * BITS
        word = (offs_k // PC) * PW + pos // 32
        shift = pos % 32
        wk_ok = k_ok[:, None] & n_ok[None, :]
        lo = tl.load(q_ptr + word[:, None] * N + offs_n[None, :], mask=wk_ok, other=0)
        code = (lo >> shift[:, None]) & mask
        if BITS == 3:  # the straddling codes take their high bits from the next word
            low = 32 - shift
            straddle = (shift + BITS) > 32
            hi = tl.load(q_ptr + (word + 1)[:, None] * N + offs_n[None, :], mask=wk_ok & straddle[:, None], other=0)
            joined = ((lo >> shift[:, None]) & ((1 << low[:, None]) - 1)) | ((hi << low[:, None]) & mask)
            code = tl.where(straddle[:, None], joined, code)
        c = code.to(tl.float32)
        if HAS_MARKERS:
            mw = tl.load(m_ptr + (offs_k // 16)[:, None] * N + offs_n[None, :], mask=wk_ok, other=0)
            field = (mw >> (2 * (offs_k % 16))[:, None]) & 3
            c += (field - ((field & 2) << 1)).to(tl.float32)  # 0, 1, 3 -> 0, +1, -1
        g = tl.load(g_ptr + offs_k, mask=k_ok, other=0)
        s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=wk_ok, other=0.0)
        z = tl.load(z_ptr + g[:, None] * N + offs_n[None, :], mask=wk_ok, other=0.0)
        w = (c - z) * s
        if DOT_F32:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def tile_shape(m: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): decode tiles for few rows, square-ish tiles for many."""
    return (16, 64, 128) if m <= 16 else (64, 64, 64)


def qmm(x, qweight, scales, zeros, g_idx, bits, bias=None, markers=None) -> torch.Tensor:
    """x [M, K] (fp32 / bf16 / fp16) -> [M, N] in x's dtype; fp32 accumulation; an fp32 x multiplies
    in full fp32 (no TF32)."""
    x = x.contiguous()
    M, K = x.shape
    N = qweight.shape[1]
    pc = 32 if bits == 3 else 32 // bits
    pw = 3 if bits == 3 else 1
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    bm, bn, bk = tile_shape(M)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    dummy = qweight
    _qmm_kernel[grid](
        x, qweight.contiguous(), scales.float().contiguous(), zeros.float().contiguous(),
        g_idx.to(torch.int32).contiguous(), dummy if markers is None else markers.contiguous(),
        dummy if bias is None else bias.float().contiguous(), y, M, N, K, x.stride(0), y.stride(0),
        BITS=bits, PC=pc, PW=pw, HAS_MARKERS=markers is not None, HAS_BIAS=bias is not None,
        DOT_F32=x.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return y
