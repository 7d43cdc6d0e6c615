"""lotaqaf_kernels: the kernels behind lotaqaf's quantized layers, chosen at run time.

    pick(x, bits, g_idx, n_groups)   which kernel multiplies this call: "triton" | "cpu_int4" | "torch"
    qmm(...)                         Triton: fused dequantize-and-multiply from packed GPTQ words
    ternary_step(...)                Triton: markers (with the boundary check) and the group sums behind mu
    int4_prepare / int4_mm           CPU: aten's int4 weight-pack matmul (few rows: decode)

One switch, ``set_mode("auto" | "triton" | "torch")`` (the recipe key ``kernels``; the environment
variable LOTAQAF_KERNELS sets the default): "torch" is the plain reference path (dequantize, then
matmul) everywhere; "triton" forces the Triton kernels (on CPU tensors only under TRITON_INTERPRET=1,
which is how the tests run them); "auto" takes Triton on CUDA when it is installed, aten's int4 matmul
on CPU for at most DECODE_ROWS rows of 2-, 3- or 4-bit layers with contiguous groups of 32-256, and
the torch path otherwise. Triton is optional: without it "auto" never picks it.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

MODES = ("auto", "triton", "torch")
DECODE_ROWS = 16  # at most this many rows: the decode kernels
_INT4_GROUPS = (32, 64, 128, 256)
_mode = os.environ.get("LOTAQAF_KERNELS", "auto")


def set_mode(mode: str) -> None:
    global _mode
    if mode not in MODES:
        raise ValueError(f"kernels must be one of {MODES}, got {mode!r}")
    _mode = mode


def mode() -> str:
    return _mode


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_usable(device: torch.device) -> bool:
    """Triton can run on tensors of this device: CUDA, or any device under the interpreter."""
    return triton_available() and (device.type == "cuda" or interpreting())


def contiguous_group_size(g_idx: torch.Tensor, n_groups: int) -> int | None:
    """gs when g_idx == arange(D_in) // gs with D_in == n_groups * gs (no act-order), else None."""
    d_in = g_idx.numel()
    if n_groups <= 0 or d_in % n_groups:
        return None
    gs = d_in // n_groups
    return gs if torch.equal(g_idx.long(), torch.arange(d_in, device=g_idx.device) // gs) else None


def pick(x: torch.Tensor, bits: int, group_size: int | None) -> str:
    """The kernel for x [M, D_in] times a ``bits``-wide layer whose groups are ``group_size`` contiguous
    rows (None: act-order or uneven groups)."""
    if _mode == "torch":
        return "torch"
    if _mode == "triton":
        if not triton_usable(x.device):
            raise RuntimeError("kernels=triton needs triton installed and a CUDA device "
                               "(or TRITON_INTERPRET=1 for CPU tensors)")
        return "triton"
    if triton_usable(x.device) and not interpreting():
        return "triton"
    if (x.device.type == "cpu" and x.shape[0] <= DECODE_ROWS and bits <= 4 and x.dtype in (torch.float32, torch.bfloat16)
            and group_size in _INT4_GROUPS):
        return "cpu_int4"
    return "torch"


def marker_words(idx: torch.Tensor, val: torch.Tensor, d_in: int, d_out: int) -> torch.Tensor:
    """Sparse markers (flat indices into [d_in, d_out], values +-1) as 2-bit fields packed along the
    rows, 16 per int32 word ([ceil(d_in / 16), d_out]; field 0 = no marker, 1 = +1, 3 = -1: the value's
    two's complement, so a signed shift pair recovers it)."""
    words = torch.zeros((d_in + 15) // 16 * d_out, dtype=torch.int64, device=idx.device)
    if idx.numel():
        row, col = idx // d_out, idx % d_out
        field = (val.to(torch.int64) & 3) << (2 * (row % 16))
        words.index_add_(0, (row // 16) * d_out + col, field)  # distinct fields: the sum is the OR
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).view(-1, d_out)


def qmm(x, qweight, scales, zeros, g_idx, bits, bias=None, markers=None):
    from .triton_qmm import qmm as _qmm

    return _qmm(x, qweight, scales, zeros, g_idx, bits, bias, markers)


def ternary_step(A_T, B_T, qweight, bits, g_idx, n_groups, omega, use_markers=True):
    from .triton_ternary import ternary_step as _step

    return _step(A_T, B_T, qweight, bits, g_idx, n_groups, omega, use_markers)


def int4_prepare(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int):
    """aten's CPU int4 layout of W = s[g] * (W_int - z[g]) (codes uint8 [D_in, D_out], at most 4 bits;
    2- and 3-bit codes are 4-bit codes exactly; contiguous groups of ``group_size`` rows). aten computes
    (q - 8) * scale + zero, so zero = s * (8 - z)."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.t().contiguous().to(torch.int32), 2)
    scale_zero = torch.stack([scales, scales * (8.0 - zeros)], dim=-1).to(torch.bfloat16).contiguous()
    return packed, scale_zero, group_size


def int4_mm(x: torch.Tensor, prepared, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, D_in] @ W (bf16 activations, as aten's fast CPU int4 path takes them) -> x's dtype."""
    packed, scale_zero, gs = prepared
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, gs, scale_zero).to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)
