"""The integer grid: asymmetric min-max per-group quantization and GPTQ bit packing.

Conventions (the method page's notation):
- A weight in "input-major" layout is W[i, j] with i the input row (D_in) and j the output column
  (D_out); GPTQ checkpoints store codes this way. torch's nn.Linear stores the transpose.
- Codes W_int are integers in [0, 2^N - 1]; scale s and zero point z are per (group, column);
  the group of input row i is g_idx[i].
- Dequantized weight: W_q[i, j] = s[g(i), j] * (W_int[i, j] - z[g(i), j]).

No I/O here: pure tensor functions.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def max_code(bits: int) -> int:
    return (1 << bits) - 1


def minmax_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max scale and zero point over the last dim of ``w``.

    The range is widened to include 0 (as GPTQ does) so that zero is exactly representable.
    Scales are rounded to fp16 before the zero point is derived, so a checkpoint that stores
    fp16 scales reproduces the in-memory weights exactly. Returns float32 tensors of shape
    ``w.shape[:-1]``; the zero point is an integer in [0, 2^bits - 1].
    """
    return _grid(*_range(w), max_code(bits))


def _range(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``w`` (last dim): [min, max] widened to include 0; a row of zeros gets [-1, 1]."""
    w = w.float()
    wmin = w.amin(dim=-1).clamp(max=0.0)
    wmax = w.amax(dim=-1).clamp(min=0.0)
    flat = (wmax - wmin) == 0
    return (torch.where(flat, torch.full_like(wmin, -1.0), wmin),
            torch.where(flat, torch.full_like(wmax, 1.0), wmax))


def _grid(lo: torch.Tensor, hi: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp16-rounded scale and integer zero point of the range [lo, hi]."""
    scale = ((hi - lo) / maxq).half().float()
    # fp16 rounding can underflow a tiny range to zero or to subnormals: keep scales positive.
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0**-14))
    zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def mse_params(w: torch.Tensor, bits: int, norm: float, grid: int = 100, maxshrink: float = 0.8,
               chunk_elems: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`minmax_params` with the range shrunk where that rounds better: the min-max range scaled
    by p = 1, 0.99, ..., 1 - maxshrink + 1/grid, keeping per row the p whose grid gives the smallest
    sum |w - s (q - z)|^norm (GPTQ's `--mse` search; GPTQModel's `mse`). p = 1 is plain min-max, kept
    on ties. Clipping a few outliers buys a finer step for all the other weights of the group, which
    matters most at 2 and 3 bits."""
    maxq = max_code(bits)
    w = w.float()
    wmin, wmax = _range(w)
    shrink = 1 - torch.arange(int(maxshrink * grid), device=w.device, dtype=torch.float32) / grid
    step = max(1, chunk_elems // max(1, w.numel()))  # shrink factors per pass: bounded temporaries
    best_err = best_scale = best_zero = None
    for k in range(0, shrink.numel(), step):
        p = shrink[k:k + step].reshape(-1, *([1] * wmin.dim()))  # [P, rows...]
        scale, zero = _grid(p * wmin, p * wmax, maxq)
        q = torch.clamp(torch.round(w / scale[..., None]) + zero[..., None], 0, maxq)
        err = (scale[..., None] * (q - zero[..., None]) - w).abs_().pow_(norm).sum(dim=-1)  # [P, rows...]
        e, i = err.min(dim=0)  # the first of equal errors: the widest range
        s, z = scale.gather(0, i[None]).squeeze(0), zero.gather(0, i[None]).squeeze(0)
        if best_err is None:
            best_err, best_scale, best_zero = e, s, z
        else:
            better = e < best_err
            best_err = torch.where(better, e, best_err)
            best_scale, best_zero = torch.where(better, s, best_scale), torch.where(better, z, best_zero)
    return best_scale, best_zero


def group_params(w: torch.Tensor, bits: int, mse: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A group's scale and zero point: :func:`mse_params` with norm ``mse``, or min-max when 0."""
    return mse_params(w, bits, mse) if mse > 0 else minmax_params(w, bits)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round-to-nearest codes: clamp(round(w / s) + z, 0, 2^bits - 1), as float."""
    return torch.clamp(torch.round(w / scale) + zero, 0, max_code(bits))


def group_index(d_in: int, group_size: int) -> torch.Tensor:
    """g_idx without act-order: row i belongs to group i // group_size (-1: one group)."""
    gs = d_in if group_size <= 0 else group_size
    return torch.arange(d_in, dtype=torch.int32) // gs


def num_groups(d_in: int, group_size: int) -> int:
    return 1 if group_size <= 0 else -(-d_in // group_size)


def rtn_quantize(weight_in_major: torch.Tensor, bits: int, group_size: int):
    """Round-to-nearest with min-max groups. ``weight_in_major`` is [D_in, D_out].

    Returns (codes uint8 [D_in, D_out], scales [G, D_out], zeros [G, D_out], g_idx int32 [D_in]).
    """
    d_in, d_out = weight_in_major.shape
    gs = d_in if group_size <= 0 else group_size
    if d_in % gs:
        raise ValueError(f"group size {gs} does not divide the input size {d_in}")
    w = weight_in_major.float().reshape(d_in // gs, gs, d_out).transpose(1, 2)  # [G, D_out, gs]
    scale, zero = minmax_params(w, bits)  # [G, D_out]
    codes = quantize_codes(w, scale[..., None], zero[..., None], bits)
    codes = codes.transpose(1, 2).reshape(d_in, d_out).to(torch.uint8)
    return codes, scale, zero, group_index(d_in, group_size)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
               consume: bool = False) -> torch.Tensor:
    """W_q[i, j] = s[g(i), j] * (W_int[i, j] - z[g(i), j]), input-major [D_in, D_out].

    ``consume=True``: ``codes`` is a float tensor of the scales' dtype that the caller gives up; it is
    overwritten and returned (no extra [D_in, D_out] buffers). The arithmetic is the same either way
    (one subtraction, then one multiplication, in the scales' dtype), so results are bit-identical.
    """
    d_in, d_out = codes.shape
    n_groups = scales.shape[0]
    if d_in % n_groups == 0:  # contiguous groups (no act-order): a reshape instead of two gathers
        gs = d_in // n_groups
        if torch.equal(g_idx, torch.arange(d_in, device=g_idx.device, dtype=g_idx.dtype) // gs):
            if consume and codes.dtype == scales.dtype:
                w = codes.view(n_groups, gs, d_out)
            else:
                w = codes.view(n_groups, gs, d_out).to(scales.dtype, copy=True)
            w.sub_(zeros[:, None, :]).mul_(scales[:, None, :])
            return w.view(d_in, d_out)
    g = g_idx.long()
    return scales[g] * (codes.to(scales.dtype) - zeros[g])


# ----------------------------------------------------------------------------------------------
# GPTQ packing. Codes are laid out as one little-endian bit stream along the packed dimension:
# code k occupies stream bits [k*bits, (k+1)*bits), and int32 word w holds stream bits
# [32w, 32w+32). For 2/4/8 bits this is the usual "32/bits codes per word, lowest first"; for
# 3 bits it is GPTQ's 32-codes-in-3-words layout (codes 10 and 21 straddle two words).
# ----------------------------------------------------------------------------------------------

def _packable(n: int, bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if (n * bits) % 32:
        raise ValueError(f"cannot pack {n} codes of {bits} bits into whole int32 words")


def _period(bits: int) -> tuple[int, int]:
    """(codes, words) after which the layout repeats: (32/bits, 1) for 2/4/8 bits, (32, 3) for 3."""
    lcm = math.lcm(32, bits)
    return lcm // bits, lcm // 32


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [n, m] along dim 0 into int32 words [n * bits / 32, m]."""
    n, m = codes.shape
    _packable(n, bits)
    pc, pw = _period(bits)
    c = codes.to(torch.int64).reshape(n // pc, pc, m)
    words = torch.zeros(n // pc, pw, m, dtype=torch.int64)
    for k in range(pc):
        for w in range(pw):
            s = bits * k - 32 * w  # bit position of code k relative to word w
            if -bits < s < 32:
                words[:, w] |= (c[:, k] << s) if s >= 0 else (c[:, k] >> -s)
    return _to_int32(words.reshape(n * bits // 32, m))


def packed_rows(n: int, bits: int) -> int:
    """int32 words that hold ``n`` codes along the rows, padded with zero codes to whole periods
    (a multiple of 32 codes for 3 bits, of 32 / bits otherwise): the in-memory layout of QuantLinear."""
    pc, pw = _period(bits)
    return -(-n // pc) * pw


def pack_rows_padded(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pack_rows` after padding the rows with zero codes to whole periods (any n)."""
    n, m = codes.shape
    pc, _pw = _period(bits)
    pad = (-n) % pc
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad, m)])
    return pack_rows(codes, bits)


def _straddlers(bits: int) -> list[tuple[int, int, int]]:
    """(code k in the period, word, low-bit count) for the codes that straddle two words (3 bits: 10, 21)."""
    pc, _pw = _period(bits)
    return [(k, k * bits // 32, 32 - k * bits % 32) for k in range(pc) if k * bits % 32 + bits > 32]


def _unpack_int32(words: torch.Tensor, bits: int, n: int | None) -> torch.Tensor:
    """Codes as int32 [n, m] from packed words [W, m] (every code the words hold when n is None)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    nw, m = words.shape
    pc, pw = _period(bits)
    if nw % pw:
        raise ValueError(f"{nw} words are not whole periods of {pw} for {bits} bits")
    n_all = nw // pw * pc
    n = n_all if n is None else n
    if n > n_all:
        raise ValueError(f"{nw} words of {bits}-bit codes hold {n_all} codes, not {n}")
    mask = (1 << bits) - 1
    k = torch.arange(pc, device=words.device)
    pos = k * bits
    shift = (pos % 32).to(torch.int32).view(1, pc, 1)
    wd = words.contiguous().view(nw // pw, pw, m)
    # Arithmetic shifts: bits above a code are sign copies, removed by the mask; a code that straddles
    # two words (3 bits: codes 10 and 21) is put together from both below.
    c = torch.empty(nw // pw, pc, m, dtype=torch.int32, device=words.device)  # contiguous: viewed without a copy
    for w in range(pw):  # the codes that start in word w are consecutive: one shift of that word each
        k0, k1 = -(-32 * w // bits), -(-32 * (w + 1) // bits)  # plain ints: no device sync
        torch.bitwise_right_shift(wd[:, w:w + 1], shift[:, k0:k1], out=c[:, k0:k1])
    c &= mask
    for kk, w, low in _straddlers(bits):
        c[:, kk] = ((wd[:, w] >> (32 - low)) & ((1 << low) - 1)) | ((wd[:, w + 1] << low) & mask)
    return c.view(n_all, m)[:n]


def unpack_rows(words: torch.Tensor, bits: int, n: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_rows` / :func:`pack_rows_padded`: int32 words [W, m] -> uint8 codes [n, m]
    (``n`` defaults to every code the words hold)."""
    return _unpack_int32(words, bits, n).to(torch.uint8)


def dequantize_packed(words: torch.Tensor, bits: int, scales: torch.Tensor, zeros: torch.Tensor,
                      g_idx: torch.Tensor, markers: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """:func:`dequantize` of the codes held in packed words (input-major [D_in, D_out], the scales'
    dtype), optionally with sparse markers (flat indices, +-1 values) added to the integer codes first:
    W = s[g] * ((W_int + W_hat) - z[g]). Integer-valued floats add exactly, so a layer whose codes
    already hold W_hat gives the same bits."""
    codes = _unpack_int32(words, bits, g_idx.numel()).to(scales.dtype)
    if markers is not None and markers[0].numel():
        codes.view(-1).index_add_(0, markers[0], markers[1].to(codes.dtype))
    return dequantize(codes, scales, zeros, g_idx, consume=True)


def codes_at(words: torch.Tensor, bits: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The codes at (rows[k], cols[k]) of packed words, without unpacking the rest (int64)."""
    pc, pw = _period(bits)
    rows, cols = rows.long(), cols.long()
    pos = (rows % pc) * bits
    base = (rows // pc) * pw
    w, s = base + pos // 32, pos % 32
    lo = (words[w, cols].to(torch.int64) & 0xFFFFFFFF) >> s
    straddle = s + bits > 32
    if bool(straddle.any()):
        hi = (words[(w + 1).clamp(max=words.shape[0] - 1), cols].to(torch.int64) & 0xFFFFFFFF) << (32 - s)
        lo = torch.where(straddle, lo | hi, lo)
    return lo & ((1 << bits) - 1)


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack [m, n] along dim 1 (GPTQ qzeros layout) into int32 [m, n * bits / 32]."""
    return pack_rows(codes.t(), bits).t().contiguous()


def unpack_cols(words: torch.Tensor, bits: int, n: int | None = None) -> torch.Tensor:
    return unpack_rows(words.t(), bits, n).t().contiguous()


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret values in [0, 2^32) held in int64 as int32 bit patterns."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _ones_words(bits: int, n_words: int) -> torch.Tensor:
    """The packed words of a row of codes that are all 1."""
    pc, _pw = _period(bits)
    pattern = pack_rows(torch.ones((pc, 1), dtype=torch.int64), bits)[:, 0].to(torch.int64) & 0xFFFFFFFF
    return pattern.repeat(-(-n_words // len(pattern)))[:n_words]


def pack_zeros_v1(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ "v1" qzeros [G, D_out * bits / 32], bit-compatible with gptqmodel.

    v1 stores z - 1. For 2, 4 and 8 bits gptqmodel converts by subtracting the packed all-ones
    word from every int32 word (mod 2^32), so a zero point of 0 borrows from the field above it;
    for 3 bits it works per field, mod 8. Both are exactly inverted by :func:`unpack_zeros_v1`.
    """
    z = zeros.round().to(torch.int64)
    if bits == 3:
        return pack_cols((z - 1) % 8, bits)
    words = pack_cols(z, bits).to(torch.int64) & 0xFFFFFFFF
    return _to_int32(words - _ones_words(bits, words.shape[1]).view(1, -1))


def unpack_zeros_v1(qzeros: torch.Tensor, bits: int, n_cols: int) -> torch.Tensor:
    if bits == 3:
        return ((unpack_cols(qzeros, bits, n_cols).to(torch.int64) + 1) % 8).to(torch.uint8)
    words = (qzeros.to(torch.int64) & 0xFFFFFFFF) + _ones_words(bits, qzeros.shape[1]).view(1, -1)
    return unpack_cols(_to_int32(words), bits, n_cols)


def pack_ternary(t: torch.Tensor) -> torch.Tensor:
    """Ternary values {-1, 0, 1} (any shape) -> int32 words: value + 1 as 2-bit codes, flattened
    row-major, 16 per word in GPTQ's bit order, padded with zeros (code 1) to a whole word."""
    flat = (t.detach().round().to(torch.int64).flatten() + 1).cpu()
    pad = (-flat.numel()) % 16
    flat = torch.cat([flat, torch.ones(pad, dtype=torch.int64)])
    return pack_rows(flat.view(-1, 1), 2)[:, 0].contiguous()


def unpack_ternary(words: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: int8 tensor of ``shape``."""
    n = int(torch.tensor(shape).prod())
    flat = unpack_rows(words.view(-1, 1), 2)[:, 0].to(torch.int8) - 1
    return flat[:n].view(*shape)
