"""GPTQ (Frantar et al., 2022): second-order weight quantization of one linear layer.

Weights here are in nn.Linear layout W[out, in]; GPTQ quantizes the input columns one by one and
spreads each column's rounding error over the not-yet-quantized columns through the inverse
Hessian of the layer's inputs (H = 2/n * X^T X). Lazy block updates keep it fast; act-order
visits columns by decreasing Hessian diagonal and records the group of each column in g_idx.

No I/O here: the caller collects inputs, this file only does the math.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quant import group_index, group_params, num_groups, quantize_codes


class HessianAccumulator:
    """Running H = 2/n * sum x x^T over all input rows seen so far (float32)."""

    def __init__(self, d_in: int, device=None):
        self.H = torch.zeros(d_in, d_in, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)
        n = x.shape[0]
        self.H.mul_(self.nsamples / (self.nsamples + n))
        self.nsamples += n
        x = x * (2.0 / self.nsamples) ** 0.5
        self.H.addmm_(x.t(), x)


@dataclass
class QuantResult:
    codes: torch.Tensor   # uint8 [D_in, D_out]  (input-major, as GPTQ checkpoints store them)
    scales: torch.Tensor  # float32 [G, D_out]
    zeros: torch.Tensor   # float32 [G, D_out]
    g_idx: torch.Tensor   # int32 [D_in]


def group_aware_order(diag: torch.Tensor, group_size: int) -> torch.Tensor:
    """The visiting order of group-aware reordering (GAR; Gafni et al., CVPRW 2025, as GPTQModel's
    `act_group_aware`): groups by decreasing largest Hessian diagonal, and inside each group its
    columns by decreasing diagonal. Each group's columns stay together, so the codes keep the
    trivial g_idx; ``perm[k]`` is the column visited k-th. Ties keep the column order (stable)."""
    d_in = diag.numel()
    gs = d_in if group_size <= 0 else group_size
    per_group = diag.reshape(d_in // gs, gs)
    inner = torch.argsort(per_group, dim=1, descending=True, stable=True)
    order = torch.argsort(per_group.amax(dim=1), descending=True, stable=True)
    return (inner + gs * torch.arange(d_in // gs, device=diag.device)[:, None])[order].reshape(-1)


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, *,
                  damp_percent: float = 0.01, block_size: int = 128, act_order: bool = False,
                  act_group_aware: bool = False, static_groups: bool = False, mse: float = 0.0) -> QuantResult:
    """Quantize ``weight`` [D_out, D_in] with GPTQ given the input Hessian ``H`` [D_in, D_in].

    Visiting order: act_order (decreasing Hessian diagonal, groups by visiting position: g_idx),
    else act_group_aware (:func:`group_aware_order`: trivial g_idx), else the column order.
    Each group's scale and zero point come from the group's weights as they stand at the start of
    the lazy block that holds its first column (W is updated once per block), as in GPTQ and
    GPTQModel; docs/decisions.md says why not from the columns' latest values. ``mse`` > 0: each
    group's range is searched (quant.mse_params) instead of min-max."""
    W = weight.detach().clone().float()
    d_out, d_in = W.shape
    gs = d_in if group_size <= 0 else group_size
    G = num_groups(d_in, group_size)
    H = H.detach().clone().float().to(W.device)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    scales = torch.zeros(G, d_out, device=W.device)
    zeros = torch.zeros(G, d_out, device=W.device)
    if static_groups:  # all group parameters from the original weights, before any update
        for g in range(G):
            scales[g], zeros[g] = group_params(W[:, g * gs:(g + 1) * gs], bits, mse)

    perm = torch.arange(d_in, device=W.device)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
    elif act_group_aware:
        perm = group_aware_order(torch.diag(H), group_size)
    W, H = W[:, perm], H[perm][:, perm]
    invperm = torch.argsort(perm)

    damp = damp_percent * torch.mean(torch.diag(H))
    H += damp * torch.eye(d_in, device=W.device)
    Hinv = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(Hinv)
    Hinv = torch.linalg.cholesky(Hinv, upper=True)

    Q = torch.zeros_like(W)
    scale = zero = None
    for i1 in range(0, d_in, block_size):
        i2 = min(i1 + block_size, d_in)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static_groups:
                g = int(perm[col]) // gs
                scale, zero = scales[g], zeros[g]
            elif col % gs == 0:
                scale, zero = group_params(W[:, col:col + gs], bits, mse)  # W: as at the start of this block
                g = col // gs if act_order else int(perm[col]) // gs  # act_order: g_idx follows the visit
                scales[g], zeros[g] = scale, zero
            w = W1[:, i]
            d = Hinv1[i, i]
            q = quantize_codes(w, scale, zero, bits)
            Q1[:, i] = q
            err = (w - scale * (q - zero)) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if act_order and not static_groups:
        g_idx = (invperm // gs).to(torch.int32)  # original row r sat at position invperm[r]
    else:
        g_idx = group_index(d_in, group_size).to(W.device)
    codes = Q[:, invperm].t().contiguous().to(torch.uint8)
    return QuantResult(codes.cpu(), scales.cpu(), zeros.cpu(), g_idx.cpu())


def output_error(weight: torch.Tensor, weight_q: torch.Tensor, H: torch.Tensor) -> float:
    """Relative output error on the calibration inputs, through the Hessian:
    ||X dW^T||^2 / ||X W^T||^2 = tr(dW H dW^T) / tr(W H W^T)."""
    W = weight.float()
    dW = W - weight_q.float().to(W.device)
    H = H.to(W.device)
    num = torch.einsum("oi,ij,oj->", dW, H, dW)
    den = torch.einsum("oi,ij,oj->", W, H, W)
    return float(num / den.clamp_min(1e-30))
