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
    maxq = max_code(bits)
    w = w.float()
    wmin = w.amin(dim=-1).clamp(max=0.0)
    wmax = w.amax(dim=-1).clamp(min=0.0)
    flat = (wmax - wmin) == 0
    wmin = torch.where(flat, torch.full_like(wmin, -1.0), wmin)
    wmax = torch.where(flat, torch.full_like(wmax, 1.0), wmax)
    scale = ((wmax - wmin) / maxq).half().float()
    # fp16 rounding can underflow a tiny range to zero or to subnormals: keep scales positive.
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0**-14))
    zero = torch.round(-wmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round-to-nearest codes: clamp(round(w / s) + z, 0, 2^bits - 1), as float."""
    return torch.clamp(torch.round(w / scale) + zero, 0, max_code(bits))


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (codes - zero)


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


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """W_q[i, j] = s[g(i), j] * (W_int[i, j] - z[g(i), j]), input-major [D_in, D_out]."""
    g = g_idx.long()
    return scales[g] * (codes.to(scales.dtype) - zeros[g])


# ----------------------------------------------------------------------------------------------
# GPTQ packing. Codes are laid out as one little-endian bit stream along the packed dimension:
# code k occupies stream bits [k*bits, (k+1)*bits), and int32 word w holds stream bits
# [32w, 32w+32). For 2/4/8 bits this is the usual "32/bits codes per word, lowest first"; for
# 3 bits it is GPTQ's 32-codes-in-3-words layout (codes 10 and 21 straddle two words).
# ----------------------------------------------------------------------------------------------

_COLUMN_CHUNK = 8192  # bounds the temporary bit tensor for very wide matrices


def _packable(n: int, bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if (n * bits) % 32:
        raise ValueError(f"cannot pack {n} codes of {bits} bits into whole int32 words")


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [n, m] along dim 0 into int32 words [n * bits / 32, m]."""
    n, m = codes.shape
    _packable(n, bits)
    shifts_bits = torch.arange(bits, dtype=torch.int64)
    shifts_word = torch.arange(32, dtype=torch.int64).view(1, 32, 1)
    out = torch.empty((n * bits // 32, m), dtype=torch.int32)
    for c0 in range(0, m, _COLUMN_CHUNK):
        c = codes[:, c0:c0 + _COLUMN_CHUNK].to(torch.int64)
        stream = (c.unsqueeze(1) >> shifts_bits.view(1, bits, 1)) & 1  # [n, bits, mc]
        stream = stream.reshape(n * bits // 32, 32, -1)
        words = (stream << shifts_word).sum(dim=1)  # disjoint bits: sum == or; < 2^32
        out[:, c0:c0 + _COLUMN_CHUNK] = _to_int32(words)
    return out


def unpack_rows(words: torch.Tensor, bits: int, n: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 words [n * bits / 32, m] -> uint8/int codes [n, m]."""
    nw, m = words.shape
    n = nw * 32 // bits if n is None else n
    _packable(n, bits)
    shifts_word = torch.arange(32, dtype=torch.int64).view(1, 32, 1)
    shifts_bits = torch.arange(bits, dtype=torch.int64).view(1, bits, 1)
    dtype = torch.uint8 if bits <= 8 else torch.int32
    out = torch.empty((n, m), dtype=dtype)
    for c0 in range(0, m, _COLUMN_CHUNK):
        w = words[:, c0:c0 + _COLUMN_CHUNK].to(torch.int64) & 0xFFFFFFFF
        stream = (w.unsqueeze(1) >> shifts_word) & 1  # [nw, 32, mc]
        stream = stream.reshape(n, bits, -1)
        out[:, c0:c0 + _COLUMN_CHUNK] = (stream << shifts_bits).sum(dim=1).to(dtype)
    return out


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack [m, n] along dim 1 (GPTQ qzeros layout) into int32 [m, n * bits / 32]."""
    return pack_rows(codes.t(), bits).t().contiguous()


def unpack_cols(words: torch.Tensor, bits: int, n: int | None = None) -> torch.Tensor:
    return unpack_rows(words.t(), bits, n).t().contiguous()


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret values in [0, 2^32) held in int64 as int32 bit patterns."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_zeros_v1(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ "v1" qzeros [G, D_out * bits / 32]: each zero point is stored as (z - 1) mod 2^bits.

    The modular form makes z == 0 representable (stored as 2^bits - 1) and keeps the mapping a
    bijection; :func:`unpack_zeros_v1` adds the 1 back, also mod 2^bits.
    """
    stored = (zeros.round().to(torch.int64) - 1) % (1 << bits)
    return pack_cols(stored, bits)


def unpack_zeros_v1(qzeros: torch.Tensor, bits: int, n_cols: int) -> torch.Tensor:
    return ((unpack_cols(qzeros, bits, n_cols).to(torch.int64) + 1) % (1 << bits)).to(torch.uint8)
