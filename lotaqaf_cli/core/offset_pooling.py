"""Offset granularity of ternary adaptation: the set each mean of the offset factor mu runs over (and so
the gradient's extra term), and the quantization-group layout those means use.

The granularities live here only, as the OffsetPooling classes; core.ternary.TernaryLinear picks its
instance from :data:`POOLINGS` once. Pure tensor math.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GRANULARITIES = ("group", "channel", "tensor", "none")


def check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"offset granularity must be one of {GRANULARITIES}, got {granularity!r}")


def rows_per_group(g_idx: torch.Tensor, n_groups: int) -> torch.Tensor:
    return torch.bincount(g_idx.long(), minlength=n_groups)[:n_groups]


@dataclass(frozen=True)
class GroupLayout:
    """Which input rows form each quantization group: ``g_idx`` [D_in], ``n_groups`` G, ``gs`` the
    group size when the groups are contiguous rows (else None: act-order or uneven groups, handled by
    gathers / index_add_), ``counts`` the rows per group (int64 [G], at least 1)."""

    g_idx: torch.Tensor
    n_groups: int
    gs: int | None
    counts: torch.Tensor

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of the rows of ``t`` [D_in, D_out] within each group -> [G, D_out]."""
        if self.gs is not None:
            return t.view(self.n_groups, self.gs, t.shape[1]).sum(dim=1)
        return t.new_zeros(self.n_groups, t.shape[1]).index_add_(0, self.g_idx.long(), t)

    def scale_rows_(self, g: torch.Tensor, s: torch.Tensor) -> None:
        """g[i, j] *= s[g_idx[i], j], in place (``s`` [G, D_out])."""
        if self.gs is not None:
            gv = g.view(self.n_groups, self.gs, g.shape[1])
            gv *= s[:, None]
        else:
            g *= s[self.g_idx.long()]

    def add_mean_grad_(self, g: torch.Tensor, omega: float) -> None:
        """g[i, j] += (sum of g over the rows of group(i), column j) / (omega * n_group), in place."""
        if self.gs is not None:
            gv = g.view(self.n_groups, self.gs, g.shape[1])
            gv += (gv.sum(dim=1) / (omega * self.gs))[:, None]
        else:
            idx = self.g_idx.long()
            sums = g.new_zeros(self.n_groups, g.shape[1]).index_add_(0, idx, g)
            g += (sums / (self.counts.to(g.dtype)[:, None] * omega))[idx]


class OffsetPooling:
    """One offset granularity: how mu pools R = dW - omega * W_hat, and the matching term of dL/d dW.

    The subclasses are the only code that knows the granularities; the layer picks its instance from
    :data:`POOLINGS` once. ``residual``: whether mu needs R (False only for "none").
    """

    name: str
    residual = True

    def mu(self, R: torch.Tensor, omega: float, groups: GroupLayout) -> torch.Tensor | None:
        """mu (fp32) from R (fp32 [D_in, D_out], may be overwritten); None: no offset factor."""
        raise NotImplementedError

    def mu_from_group_sums(self, r_sums: torch.Tensor, omega: float, groups: GroupLayout) -> torch.Tensor | None:
        """mu from the per-group sums of R ([G, D_out], as the Triton ternary step returns them)."""
        raise NotImplementedError

    def add_grad_(self, h: torch.Tensor, omega: float, groups: GroupLayout) -> None:
        """In place, h = s[g] * G += (sum of h over the mean's set) / (omega * set size): mu's share of
        dL/d dW under the straight-through estimator."""
        raise NotImplementedError


class _NoPooling(OffsetPooling):
    name, residual = "none", False

    def mu(self, R, omega, groups):
        return None

    def mu_from_group_sums(self, r_sums, omega, groups):
        return None

    def add_grad_(self, h, omega, groups):
        pass


class _GroupPooling(OffsetPooling):
    name, residual = "group", True

    def mu(self, R, omega, groups):
        mu = groups.sum(R)
        mu /= groups.counts.to(mu.dtype)[:, None] * omega
        return mu

    def mu_from_group_sums(self, r_sums, omega, groups):
        return r_sums / (groups.counts.to(r_sums.dtype)[:, None] * omega)

    def add_grad_(self, h, omega, groups):
        groups.add_mean_grad_(h, omega)


class _ChannelPooling(OffsetPooling):
    name, residual = "channel", True

    def mu(self, R, omega, groups):
        return R.mean(dim=0, keepdim=True) / omega

    def mu_from_group_sums(self, r_sums, omega, groups):
        return r_sums.sum(dim=0, keepdim=True) / (groups.g_idx.numel() * omega)

    def add_grad_(self, h, omega, groups):
        h += h.sum(dim=0, keepdim=True) / (omega * h.shape[0])


class _TensorPooling(OffsetPooling):
    name, residual = "tensor", True

    def mu(self, R, omega, groups):
        return R.mean().view(1, 1) / omega

    def mu_from_group_sums(self, r_sums, omega, groups):
        return r_sums.sum().view(1, 1) / (groups.g_idx.numel() * r_sums.shape[1] * omega)

    def add_grad_(self, h, omega, groups):
        h += h.sum() / (omega * h.numel())


POOLINGS: dict[str, OffsetPooling] = {
    p.name: p for p in (_GroupPooling(), _ChannelPooling(), _TensorPooling(), _NoPooling())}
assert tuple(POOLINGS) == GRANULARITIES
