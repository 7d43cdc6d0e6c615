"""Float64 reference implementations of ternary adaptation (method page, section 1), for tests only.

Written straight from the formulas: dense tensors, float64, no sparse markers, no in-place pooling,
no fused backward. core/ternary.py is what runs; the tests hold it against these.

Notation as in core/quant.py (input-major): codes W_int [D_in, D_out], scales s and zero points z
[G, D_out], group of input row i = g_idx[i]; dW = A_T @ B_T [D_in, D_out].
"""

from __future__ import annotations

import torch

from lotaqaf_cli.core.offset_pooling import GRANULARITIES
from lotaqaf_cli.core.qlinear import QuantLinear
from lotaqaf_cli.core.quant import max_code


def _check(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"offset granularity must be one of {GRANULARITIES}, got {granularity!r}")


def _dense_mask(mask: torch.Tensor | None, shape) -> torch.Tensor | None:
    """A boundary mask as bool [D_in, D_out]."""
    return None if mask is None else mask.reshape(shape).bool()


def markers(dW: torch.Tensor, omega: float, can_up: torch.Tensor | None = None,
            can_down: torch.Tensor | None = None, return_blocked: bool = False):
    """W_hat = sign(dW) * [|dW| > omega] as int8 [D_in, D_out], with the boundary check: a +1 is
    suppressed where ``can_up`` is False (W_int == 2^N-1), a -1 where ``can_down`` is False (W_int == 0).

    The masks are bool tensors shaped like dW;
    None: no check on that side. With ``return_blocked`` also returns the number of suppressed markers.
    """
    d = dW.double()
    w = torch.sign(d) * (d.abs() > omega).double()
    blocked = torch.zeros(dW.shape, dtype=torch.bool, device=dW.device)
    up, down = _dense_mask(can_up, dW.shape), _dense_mask(can_down, dW.shape)
    if up is not None:
        blocked |= (w > 0) & ~up
    if down is not None:
        blocked |= (w < 0) & ~down
    w_hat = torch.where(blocked, torch.zeros_like(w), w).to(torch.int8)
    return (w_hat, int(blocked.sum())) if return_blocked else w_hat


def _group_mean_rows(t: torch.Tensor, g_idx: torch.Tensor, n_groups: int) -> torch.Tensor:
    """[G, D_out]: mean of the rows of ``t`` in each group (0 for an empty group)."""
    g = g_idx.long()
    sums = torch.zeros(n_groups, t.shape[1], dtype=t.dtype, device=t.device).index_add_(0, g, t)
    counts = torch.bincount(g, minlength=n_groups)[:n_groups].clamp(min=1).to(t.dtype)
    return sums / counts[:, None]


def offset_factor(dW: torch.Tensor, W_hat: torch.Tensor, omega: float, g_idx: torch.Tensor,
                  granularity: str = "group", num_groups: int | None = None) -> torch.Tensor | None:
    """mu = (mean of R = dW - omega * W_hat over the pooling set) / omega, float64.

    group: over the rows of each group (g_idx, act-order allowed) -> [G, D_out];
    channel: over all D_in rows -> [1, D_out]; tensor: over all elements -> [1, 1]; none: None.
    ``num_groups`` defaults to max(g_idx) + 1; an empty group gets mu = 0.
    """
    _check(granularity)
    if granularity == "none":
        return None
    R = dW.double() - omega * W_hat.double()
    if granularity == "channel":
        return R.mean(dim=0, keepdim=True) / omega
    if granularity == "tensor":
        return R.mean().view(1, 1) / omega
    n_groups = int(g_idx.max()) + 1 if num_groups is None else num_groups
    return _group_mean_rows(R, g_idx, n_groups) / omega


def mu_rows(mu: torch.Tensor | None, g_idx: torch.Tensor, granularity: str):
    """mu broadcastable to [D_in, D_out]: mu[g(i)] per row for "group", as is otherwise, 0 for none."""
    if mu is None:
        return 0.0
    return mu[g_idx.long()] if granularity == "group" else mu


def effective_weight(base: QuantLinear, A_T: torch.Tensor, B_T: torch.Tensor, omega: float,
                     granularity: str = "group", dtype: torch.dtype = torch.float64,
                     use_markers: bool = True) -> torch.Tensor:
    """W_eff = s[g] * (W_int - z[g] + W_hat + mu[g]), input-major, in ``dtype`` (W_hat = 0 when
    ``use_markers`` is False: the offset factor alone, mu from R = dW)."""
    codes = base.codes.to(dtype)
    dW = A_T.detach().to(dtype) @ B_T.detach().to(dtype)
    w_hat = markers(dW, omega, base.codes < max_code(base.bits), base.codes > 0).to(dtype)
    if not use_markers:
        w_hat = torch.zeros_like(w_hat)
    mu = offset_factor(dW, w_hat, omega, base.g_idx, granularity, num_groups=base.scales.shape[0])
    mu = None if mu is None else mu.to(dtype)
    g = base.g_idx.long()
    s, z = base.scales.to(dtype)[g], base.zeros.to(dtype)[g]
    return s * (codes - z + w_hat + mu_rows(mu, base.g_idx, granularity))


def ste_grad_dW(G: torch.Tensor, base: QuantLinear, omega: float, granularity: str = "group") -> torch.Tensor:
    """Straight-through dL/d dW (float64) from G = x^T dy [D_in, D_out].

    d W_hat / d dW is taken as identity for the W_hat term of W_eff, and the gradient also flows
    through mu (not detached), where W_hat in R = dW - omega * W_hat counts as a constant. With
    H = s[g] * G:  dL/d dW[i, j] = H[i, j] + (sum of H over the pooling set of (i, j)) / (omega * set
    size). For "group" s is constant over the set, which gives the method
    page's s[g(i), j] * (G[i, j] + sum over i' in group(i) of G[i', j] / (omega * gs)).
    Then dL/dA_T = dL/d dW @ B_T^T and dL/dB_T = A_T^T @ dL/d dW.
    """
    _check(granularity)
    g = base.g_idx.long()
    H = base.scales.double()[g] * G.double()
    if granularity == "none":
        return H
    if granularity == "channel":
        return H + H.sum(dim=0, keepdim=True) / (omega * H.shape[0])
    if granularity == "tensor":
        return H + H.sum() / (omega * H.numel())
    return H + _group_mean_rows(H, base.g_idx, base.scales.shape[0])[g] / omega
