"""Random QuantLinear layers for the tests: one factory, so that every test builds them the same way."""

import torch

from lotaqaf_cli.core.qlinear import QuantLinear

ZEROS = ("integer", "fractional", "near_integer")


def random_qlinear(d_in: int, d_out: int, bits: int, group_size: int, *, seed: int = 0, act_order: bool = False,
                   bias: bool = False, zeros: str = "integer", scales: tuple[float, float] = (0.01, 0.05),
                   edge_codes: bool = False, fp16_scales: bool = False) -> QuantLinear:
    """A QuantLinear [d_in -> d_out] of uniform random codes in [0, 2^bits - 1] and d_in // group_size
    groups. One generator seeded ``seed`` draws, in this order: the codes, the scales, the zero points,
    the act-order permutation, the bias.

    - ``scales`` = (lo, width): each scale is lo + width * U(0, 1); ``fp16_scales`` rounds them to
      float16 (as a checkpoint holds them).
    - ``zeros``: "integer" (on the code grid, as GPTQ stores them), "fractional" (U(0, 2^bits - 1): a
      merged layer's z - mu, no grid at all) or "near_integer" (integer minus mu in (-0.45, 0.45): what a
      merge leaves).
    - ``edge_codes``: input rows 0 and 1 all at 0 and 2^bits - 1 (both grid edges occur).
    - ``act_order``: the rows scattered over the groups (each group keeps group_size rows).
    """
    if zeros not in ZEROS:
        raise ValueError(f"zeros must be one of {ZEROS}, got {zeros!r}")
    g = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    n_groups = d_in // group_size
    codes = torch.randint(0, maxq + 1, (d_in, d_out), generator=g)
    if edge_codes:
        codes[0], codes[1] = 0, maxq
    lo, width = scales
    s = torch.rand(n_groups, d_out, generator=g) * width + lo
    if fp16_scales:
        s = s.half().float()
    if zeros == "fractional":
        z = torch.rand(n_groups, d_out, generator=g) * maxq
    else:
        z = torch.randint(0, maxq + 1, (n_groups, d_out), generator=g).float()
        if zeros == "near_integer":
            z = z - (torch.rand(n_groups, d_out, generator=g) - 0.5) * 0.9
    g_idx = torch.arange(d_in, dtype=torch.int32) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(d_in, generator=g)]
    b = torch.randn(d_out, generator=g) if bias else None
    return QuantLinear.from_quantized(codes, s, z, g_idx, bits, group_size, b)


def dense64(q: QuantLinear) -> torch.Tensor:
    """The layer's weight in float64, input-major [D_in, D_out]: s[g] * (W_int - z[g])."""
    g = q.g_idx.long()
    return q.scales.double()[g] * (q.codes.double() - q.zeros.double()[g])
