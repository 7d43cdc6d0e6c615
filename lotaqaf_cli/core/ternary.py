"""Ternary adaptation (TA) of a QuantLinear: the method page, section 1.

Notation (input-major, as in quant.py): codes W_int [D_in, D_out], scales s and zero points z
[G, D_out], group of input row i = g_idx[i]. The adapter is two ternary matrices A_T [D_in, r] and
B_T [r, D_out]; dW = A_T @ B_T has integer entries in [-r, r].

- markers  W_hat = sign(dW) * [|dW| > omega], +1 suppressed where W_int == 2^N-1, -1 where W_int == 0
- offset factor  mu = (mean of R = dW - omega * W_hat over the rows of a group) / omega
- W_eff = s[g] * (W_int - z[g] + W_hat + mu[g]);  y = x @ W_eff (+ bias)
- gradient: straight-through (d W_hat / d dW = identity), flowing through mu as well.
- ``markers=False`` (the ablation "offset factor only"): W_hat = 0 in the forward and the merge, so
  R = dW; the gradient estimator is unchanged.

The granularity of mu (the set each mean runs over) lives in one place, the OffsetPooling classes of
offset_pooling.py; the layer picks its instance once. Plain float64 references of these formulas are in
tests/reference.py.

Pure tensor math: no I/O, no printing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import lotaqaf_kernels as kernels
import torch
from torch import nn

from .offset_pooling import POOLINGS, GroupLayout, check_granularity, rows_per_group
from .qlinear import QuantLinear, quant_matmul, replace_module
from .quant import codes_at, dequantize_packed, max_code

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INIT_THRESHOLD = 0.75  # ternarisation threshold, times mean|A|


# ----------------------------------------------------------------------------------------------
# Initialisation
# ----------------------------------------------------------------------------------------------

def ternarize(a: torch.Tensor, factor: float = INIT_THRESHOLD) -> torch.Tensor:
    """x > t -> 1, x < -t -> -1, else 0, with t = factor * mean|a|."""
    t = factor * a.abs().mean()
    return (a > t).to(a.dtype) - (a < -t).to(a.dtype)


def ternary_init_A(d_in: int, r: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Ternarised Kaiming-normal A_T [d_in, r] (float32, values in {-1, 0, 1}).

    Drawn by ``nn.init.kaiming_normal_`` on the [d_in, r] matrix (fan_in mode, so fan = r = size(1),
    gain sqrt(2)). The scale is irrelevant: the threshold 0.75 * mean|A| is relative, so about
    erf(0.75 / sqrt(pi)) ~ 45% of the entries become 0.
    """
    a = nn.init.kaiming_normal_(torch.empty(d_in, r), generator=generator)
    return ternarize(a)


def ternary_init_B(r: int, d_out: int) -> torch.Tensor:
    """B_T = 0 [r, d_out]: the adapter starts as a no-op."""
    return torch.zeros(r, d_out)


# ----------------------------------------------------------------------------------------------
# Markers (sparse, with the boundary check against the packed codes) and the group layout
# ----------------------------------------------------------------------------------------------

def marker_entries(dW: torch.Tensor, omega: float, qweight: torch.Tensor | None = None, bits: int | None = None,
                   cols: torch.Tensor | None = None, d_out: int | None = None):
    """Sparse markers: (flat indices int64, values int8 +-1) of the non-zero W_hat entries after the
    boundary check, and the number of markers the boundary suppressed (0-d tensor).

    The boundary check reads the codes from the packed words ``qweight`` (``bits`` wide) at the
    elements whose |dW| crossed omega only: a +1 is suppressed where W_int == 2^N-1, a -1 where
    W_int == 0; no check without ``qweight``. With ``cols`` (sorted int64), ``dW`` holds only those
    columns of a [D_in, ``d_out``] product, and the indices are the whole product's. (On CUDA the
    ``nonzero`` is a host sync.)
    """
    flat = dW.reshape(-1)
    lo, hi = torch.aminmax(flat) if flat.numel() else (flat.new_zeros(()), flat.new_zeros(()))
    if -omega <= float(lo) and float(hi) <= omega:  # nothing crossed (the usual case at omega ~ 0.75 r)
        empty = torch.zeros(0, dtype=torch.int64, device=dW.device)
        return empty, empty.to(torch.int8), torch.zeros((), dtype=torch.int64, device=dW.device)
    idx = (flat.abs() > omega).nonzero().squeeze(1)
    up = flat[idx] > 0
    if cols is not None:  # local [D_in, len(cols)] positions -> the whole product's
        idx = idx // dW.shape[1] * d_out + cols[idx % dW.shape[1]]
    d_out = dW.shape[1] if d_out is None else d_out
    ok = torch.ones_like(up)
    if qweight is not None:
        code = codes_at(qweight, bits, idx // d_out, idx % d_out)
        ok = torch.where(up, code < max_code(bits), code > 0)
    blocked = (~ok).sum()
    return idx[ok], up[ok].to(torch.int8) * 2 - 1, blocked


# ----------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------

def merged_zeros(zeros: torch.Tensor, mu: torch.Tensor | None) -> torch.Tensor:
    """The fractional zero points z' = z - mu (float32) that absorb the offset factor."""
    return zeros.float() if mu is None else zeros.float() - mu


def auxiliary_product(A_T: torch.Tensor, B_T: torch.Tensor) -> torch.Tensor:
    """dW = A_T @ B_T (fp32). Its entries are integers in [-r, r], and every partial sum too, so for
    r <= 256 the product is exact in bf16 (8 significant bits) whatever the accumulation order or
    precision: it is formed there (half the memory traffic, twice the speed on CPUs with bf16 units)."""
    if A_T.shape[1] <= 256:
        return (A_T.to(torch.bfloat16) @ B_T.to(torch.bfloat16)).float()
    return A_T.float() @ B_T.float()


def check_hparams(rank: int, omega: float, granularity: str = "group") -> None:
    """Raise ValueError unless rank >= 1, 0 < omega < rank and the granularity is known."""
    if int(rank) != rank or rank < 1:
        raise ValueError(f"TA rank must be an integer >= 1, got {rank}")
    if not 0 < omega < rank:
        raise ValueError(f"omega must lie in (0, rank) = (0, {rank}), got {omega}")
    check_granularity(granularity)


SIXTEEN_BIT = (torch.bfloat16, torch.float16)


class _TernaryLinearFn(torch.autograd.Function):
    """y = x @ W_eff + bias through the one quantized multiply (qlinear.quant_matmul) that the merged
    layer uses too. Saves x, A_T, B_T and the sparse markers and mu of the forward (small: the non-zero
    markers and a [G, D_out] tensor). With float32 activations the dense W_eff is rebuilt from them in
    backward when grad_x is needed, never kept alive in between; with 16-bit activations the 16-bit
    W_eff the forward formed is kept for backward instead (what autograd keeps for a LoRA layer's base:
    the same memory, and one dequantization a step instead of two)."""

    @staticmethod
    def forward(ctx, x, A_T, B_T, layer):
        idx, val, mu, blocked = layer._markers_mu(A_T, B_T)
        layer._record_marker_counts(val, blocked)
        ctx.layer, ctx.mu = layer, mu
        kept = {} if x.dtype in SIXTEEN_BIT and ctx.needs_input_grad[0] else None
        y = quant_matmul(x, layer.base, merged_zeros(layer.base.zeros, mu), (idx, val), layer._cache_for_call(),
                         weight_out=kept)
        ctx.w = None if kept is None else kept.get("w")
        ctx.save_for_backward(x, A_T, B_T, idx, val)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, A_T, B_T, idx, val = ctx.saved_tensors
        layer = ctx.layer
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        dy2 = dy.reshape(-1, dy.shape[-1])
        grad_x = grad_a = grad_b = None
        if need_x:
            w = ctx.w if ctx.w is not None else layer._weight(idx, val, ctx.mu).to(dy.dtype)
            ctx.w = None
            grad_x = (dy2 @ w.t()).view(x.shape)
        if need_a or need_b:
            x2 = x.reshape(-1, x.shape[-1])
            if layer._per_group_grads_pay(x2.shape[0]):
                grad_a, grad_b = layer._grads_per_group(x2, dy2, A_T.float(), B_T.float())
            else:
                grad_a, grad_b = layer._grads_dense(x2, dy2.to(x.dtype), A_T, B_T)
            grad_a, grad_b = grad_a.to(A_T.dtype), grad_b.to(B_T.dtype)
        return grad_x, grad_a, grad_b, None


class TernaryLinear(nn.Module):
    """A QuantLinear ``base`` (frozen, packed codes) plus ternary adapters A_T [D_in, r], B_T [r, D_out].

    The boundary check reads the packed codes where a marker fires (no mask is kept); the group layout
    is derived from the base's g_idx once (:meth:`refresh_groups`, also after load_state_dict).
    """

    def __init__(self, base: QuantLinear, rank: int, omega: float, offset_granularity: str = "group",
                 generator: torch.Generator | None = None, markers: bool = True):
        super().__init__()
        check_hparams(rank, omega, offset_granularity)  # the one check (attach_ternary_adapters relies on it)
        self.base = base
        base.requires_grad_(False)
        self.rank, self.omega = int(rank), float(omega)
        self.markers = bool(markers)  # False (an ablation): W_hat = 0 always, only the offset factor acts
        self._pooling = POOLINGS[offset_granularity]
        dtype = base.scales.dtype if base.scales.is_floating_point() else torch.float32
        dev = base.qweight.device
        d_in, d_out = base.in_features, base.out_features
        self.A_T = nn.Parameter(ternary_init_A(d_in, self.rank, generator).to(dev, dtype))
        self.B_T = nn.Parameter(ternary_init_B(self.rank, d_out).to(dev, dtype))
        self.register_buffer("group_counts", torch.empty(0, dtype=torch.int64, device=dev), persistent=False)
        self.last_marker_counts: dict | None = None
        self._cache: dict = {}
        self.refresh_groups()
        self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh_groups())

    def refresh_groups(self) -> None:
        """Recompute the group layout from the base's g_idx."""
        self._n_groups = self.base.scales.shape[0]
        self._gs = self.base.contiguous_gs  # the base's own post-load hook has run already
        self.group_counts = rows_per_group(self.base.g_idx, self._n_groups).clamp(min=1)

    def _cache_for_call(self) -> dict:
        """A kernel's prepared W_eff, valid while neither the adapters nor the base change."""
        key = tuple((t.data_ptr(), t._version) for t in (self.A_T, self.B_T, self.base.qweight, self.base.scales,
                                                         self.base.zeros))
        if self._cache.get("key") != key:
            self._cache = {"key": key}
        return self._cache

    @property
    def offset_granularity(self) -> str:
        """The set each mean of the offset factor runs over: one of GRANULARITIES."""
        return self._pooling.name

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def _groups(self) -> GroupLayout:
        """The group layout, on the buffers' current device (rebuilt per call: no tensors to go stale
        when the module is moved)."""
        return GroupLayout(self.base.g_idx, self._n_groups, self._gs, self.group_counts)

    # -- math shared by forward, backward and the logging helpers ------------------------------

    def _markers_mu(self, A_T, B_T):
        """Sparse markers (idx, val), mu (fp32 or None) and the blocked count (0-d tensor).

        On the Triton path (kernels=triton, or auto on CUDA) one kernel forms dW tile by tile, applies
        the boundary check against the packed codes and sums R per group in integers (exact, so the
        result does not depend on the order of the sums); dW is never materialised."""
        base = self.base
        if kernels.pick(A_T, base.bits, base.contiguous_gs) == "triton":
            idx, val, r_sums, blocked = kernels.ternary_step(A_T.detach(), B_T.detach(), base.qweight, base.bits,
                                                             base.g_idx, self._n_groups, self.omega, self.markers)
            return idx, val, self._pooling.mu_from_group_sums(r_sums, self.omega, self._groups), blocked
        if self._pooling.name in ("group", "none"):
            return self._markers_mu_by_columns(A_T.detach(), B_T.detach())
        dW = auxiliary_product(A_T.detach(), B_T.detach())
        if self.markers:
            idx, val, blocked = marker_entries(dW, self.omega, base.qweight, base.bits)
        else:  # markers disabled: R = dW, nothing crosses
            idx, val, blocked = marker_entries(dW, math.inf)
        if self._pooling.residual and idx.numel():  # R = dW - omega * W_hat, in place
            dW.view(-1).index_add_(0, idx, val.to(dW.dtype), alpha=-self.omega)
        return idx, val, self._pooling.mu(dW, self.omega, self._groups), blocked

    def _markers_mu_by_columns(self, A, B):
        """:meth:`_markers_mu` for group (or no) pooling without the dense dW [D_in, D_out]:

        - a marker can fire in column j only if max_i |dW[i, j]| > omega, and
          max_i |dW[i, j]| <= min(max|A| * ||B[:, j]||_1, max_i ||A[i]||_1 * max|B[:, j]|)  (a bound of
          [r] x [r] products; for ternary A, B the number of non-zeros), so dW is formed only in the
          columns whose bound exceeds omega (none, usually: omega ~ 0.75 r);
        - the group sums of R = dW - omega * W_hat are (sum of A's rows in each group) @ B minus omega times
          the markers' group sums: integers (for integer A, B) summed exactly, as the Triton ternary step
          does, so mu is the dense path's whatever the order of the sums."""
        base, omega, groups = self.base, self.omega, self._groups
        n_out = B.shape[1]
        empty = torch.zeros(0, dtype=torch.int64, device=A.device)
        idx, val, blocked = empty, empty.to(torch.int8), torch.zeros((), dtype=torch.int64, device=A.device)
        if self.markers:
            a, b = A.abs(), B.abs()
            bound = torch.minimum(a.amax() * b.sum(dim=0), a.sum(dim=1).amax() * b.amax(dim=0))
            cols = (bound > omega).nonzero().squeeze(1)
            if cols.numel():
                idx, val, blocked = marker_entries(auxiliary_product(A, B[:, cols]), omega, base.qweight, base.bits,
                                                   cols=cols, d_out=n_out)
        if not self._pooling.residual:
            return idx, val, None, blocked
        r_sums = groups.sum(A.float()) @ B.float()  # [G, D_out]: the group sums of dW
        if idx.numel():
            hat_sums = torch.zeros_like(r_sums)
            hat_sums.index_put_((groups.g_idx.long()[idx // n_out], idx % n_out), val.to(r_sums.dtype), accumulate=True)
            r_sums -= omega * hat_sums
        return idx, val, self._pooling.mu_from_group_sums(r_sums, omega, groups), blocked

    def _effective(self, A_T, B_T) -> torch.Tensor:
        """W_eff fp32 [D_in, D_out] = s[g] * ((W_int + W_hat) - (z - mu)[g])."""
        idx, val, mu, _ = self._markers_mu(A_T, B_T)
        return self._weight(idx, val, mu)

    def _weight(self, idx, val, mu) -> torch.Tensor:
        """W_eff from sparse markers and mu, computed with exactly the operations of the merged layer
        (integer codes W_int + W_hat, then quant.dequantize with zero points z - mu), so merging
        changes no output bit."""
        base = self.base
        return dequantize_packed(base.qweight, base.bits, base.scales.float(), merged_zeros(base.zeros, mu),
                                 base.g_idx, (idx, val))

    def _record_marker_counts(self, val, blocked) -> None:
        """Counts of the markers of the latest forward (0-d tensors: no host sync in the forward)."""
        self.last_marker_counts = {"nonzero": val.numel(), "blocked": blocked}

    def _grad_dW(self, g: torch.Tensor) -> torch.Tensor:
        """dL/d dW from G = x^T dy (fp32, overwritten): H + (sum of H over the mean's set) / (omega * n),
        H = s[g] * G. For the group mean s is constant in the set: s * (G + sum G / (omega * n_g))."""
        groups = self._groups
        groups.scale_rows_(g, self.base.scales.float())
        self._pooling.add_grad_(g, self.omega, groups)
        return g

    def _grads_dense(self, x, dy, A, B):
        """dL/dA_T, dL/dB_T through the dense G = x^T dy [K, N] (x, dy [T, K], [T, N] in the activations'
        dtype): dL/d dW = _grad_dW(G), then dL/dA_T = dL/d dW B_T^T and dL/dB_T = A_T^T dL/d dW. With 16-bit
        activations G, dL/d dW and the two rank-r products are 16-bit (dL/d dW formed in float32 and
        rounded once: :meth:`_grad_dW_16`); with float32 all is float32."""
        g = x.t() @ dy
        if g.dtype in SIXTEEN_BIT:
            gd = self._grad_dW_16(g)
            return gd @ B.to(gd.dtype).t(), A.to(gd.dtype).t().contiguous() @ gd
        gd = self._grad_dW(g)  # in place on G
        return gd @ B.t(), A.t() @ gd

    def _grad_dW_16(self, g: torch.Tensor) -> torch.Tensor:
        """:meth:`_grad_dW` of a 16-bit G, computed in float32 and returned in G's dtype; for contiguous
        groups and group (or no) pooling in one fused pass: s * G + s * (sum of G over the group) / (omega * gs)."""
        gf = g.float()
        if self._gs is None or self._pooling.name not in ("group", "none"):
            return self._grad_dW(gf).to(g.dtype)
        s = self.base.scales.float()[:, None]  # [G, 1, N]
        gv = gf.view(self._n_groups, self._gs, g.shape[1])
        if self._pooling.name == "group":
            torch.addcmul(s * (gv.sum(dim=1, keepdim=True) / (self.omega * self._gs)), gv, s, out=gv)
        else:
            gv *= s
        return gf.to(g.dtype)

    def _per_group_grads_pay(self, tokens: int) -> bool:
        """Whether :meth:`_grads_per_group` costs fewer multiply-adds than the dense G = x^T dy path:
        2 r (G T N + T K) against T K N + 2 K N r (T tokens, K inputs, N outputs, G groups), i.e.
        roughly when the rank is below half the group size. Group (or no) pooling, contiguous groups."""
        if self._gs is None or self._pooling.name not in ("group", "none"):
            return False
        K, N, G, r = self.in_features, self.out_features, self._n_groups, self.rank
        return 2 * r * (G * tokens * N + tokens * K) < tokens * K * N + 2 * K * N * r

    def _grads_per_group(self, x, dy, A, B):
        """dL/dA_T and dL/dB_T without the dense G = x^T dy [K, N], group by group (contiguous groups of
        gs rows, s constant over a group's rows):

            dL/d dW[i, j] = s[g, j] * G[i, j] + c[g, j],   c = s * S / (omega * gs),  S[g] = sum of G over group g
            dL/dA_T[i]  = x[:, i]^T (dy * s[g]) B_T^T + c[g] B_T^T                      (i in group g)
            dL/dB_T     = sum_g ((x_g A_g)^T dy) * s[g] + (sum_{i in g} A[i])^T c
        with S = (x summed over each group's columns)^T dy. Cost 2 r (G T N + T K) multiply-adds."""
        T, K = x.shape
        G, gs = self._n_groups, self._gs
        s = self.base.scales.float()  # [G, N]
        xg = x.float().view(T, G, gs).transpose(0, 1)  # [G, T, gs]
        dyf = dy.float()
        dys_B = torch.matmul(dyf.unsqueeze(0) * s[:, None, :], B.t())  # [G, T, r]: (dy * s[g]) B^T
        grad_a = torch.matmul(xg.transpose(1, 2), dys_B).reshape(K, -1)  # [G, gs, r] -> [K, r]
        xA = torch.matmul(xg, A.view(G, gs, -1))  # [G, T, r]
        grad_b = (torch.matmul(xA.transpose(1, 2), dyf) * s[:, None, :]).sum(dim=0)  # [r, N]
        if self._pooling.name == "group":
            c = s * (xg.sum(dim=2) @ dyf) / (self.omega * gs)  # [G, N]
            grad_a += (c @ B.t()).repeat_interleave(gs, dim=0)
            grad_b += A.view(G, gs, -1).sum(dim=1).t() @ c
        return grad_a, grad_b

    # -- public ----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _TernaryLinearFn.apply(x, self.A_T, self.B_T, self)

    @torch.no_grad()
    def markers_and_offset(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Current (W_hat int8 [D_in, D_out], mu fp32 or None) for the merge."""
        idx, val, mu, _ = self._markers_mu(self.A_T, self.B_T)
        w_hat = torch.zeros(self.in_features, self.out_features, dtype=torch.int8, device=idx.device)
        w_hat.view(-1)[idx] = val
        return w_hat, mu

    @torch.no_grad()
    def marker_stats(self) -> dict[str, int]:
        """Counts of +1 / -1 / 0 markers, markers the boundary blocked, and codes at 0 or 2^N-1."""
        idx, val, _, blocked = self._markers_mu(self.A_T, self.B_T)
        plus = int((val > 0).sum())
        minus = idx.numel() - plus
        codes = self.base.codes
        total = codes.numel()
        edge = int((codes == 0).sum()) + int((codes == max_code(self.base.bits)).sum())
        return {"plus": plus, "minus": minus, "zero": total - plus - minus,
                "blocked": int(blocked), "boundary_codes": edge, "total": total}

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, omega={self.omega}, offset_granularity={self.offset_granularity!r}"
                + ("" if self.markers else ", markers=False"))


def attach_ternary_adapters(model: nn.Module, rank: int, omega: float, offset_granularity: str = "group",
                            target_modules: Iterable[str] = DEFAULT_TARGETS,
                            generator: torch.Generator | None = None, markers: bool = True) -> list[str]:
    """Replace every QuantLinear whose name ends with one of ``target_modules`` (whole dotted
    component) by a TernaryLinear. Returns the replaced names (in module order). Other parameters
    of the model are left as they are. Invalid hyper-parameters raise ValueError from the first
    TernaryLinear, before any module is replaced."""
    targets = tuple(target_modules)
    names = [n for n, m in model.named_modules()
             if isinstance(m, QuantLinear) and any(n == t or n.endswith("." + t) for t in targets)]
    for name in names:
        base = model.get_submodule(name)
        replace_module(model, name, TernaryLinear(base, rank, omega, offset_granularity, generator=generator,
                                                  markers=markers))
    return names
