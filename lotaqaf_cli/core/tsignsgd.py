"""t-SignSGD: the optimizer for the ternary matrices A_T and B_T (method page, section 3).

Per tensor:  P <- round(clip(P - sign(g) * [|g| > max(tau, sigma_t)], -1, 1)),  tau = 1e-9,
no learning rate, no momentum. sigma_t keeps the top x_t of |g|, x_t following a schedule over the
run's real number of optimizer steps T.

Step indices are 0-based: the first call of ``step()`` uses step 0, the last of the run T - 1.
With b = floor(0.8 T) (integer arithmetic):
- steps 0..b: x goes linearly 5% -> 0.1% (step 0: 5%, step b: 0.1%), both schedules;
- steps b+1..T-1 ("phase 2", the last 20%): "reference" goes linearly from 0.1% (at b) to 0.01%
  (at T-1); "paper" is fixed at 0.01%. Steps past T-1 keep the last value.
For T <= 5 there is no phase 2 (b >= T-1). A float schedule is a constant keep fraction (ablations,
tests); phase 2 is still defined by b, for the outlier guard.

Selection: sigma_t is the (n-k)-th smallest |g| (torch.kthvalue, not torch.quantile) with
k = clamp(ceil(x * n), 1, n) entries kept: at least one entry per tensor, so tiny tensors still
move. The comparison is strict, so ties at sigma_t are not updated (at most k entries move; if all
|g| are equal none moves), as with a quantile threshold. Entries with |g| <= tau never move.

Outlier guard (reference code, phase 2 only): if the global L2 norm of all managed gradients
exceeds 10, entries above the 99.995th percentile of |g| (per tensor; by the same selection, at
least the largest entry) are not updated.
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

KEEP_START, KEEP_MID, KEEP_END = 0.05, 0.001, 0.0001
SCHEDULES = ("reference", "paper")
TAU = 1e-9
GUARD_NORM = 10.0
GUARD_QUANTILE = 0.99995


def phase_boundary(total_steps: int) -> int:
    """b = floor(0.8 T): the last step of phase 1 (gets 0.1%)."""
    return (4 * int(total_steps)) // 5


def in_phase2(step: int, total_steps: int) -> bool:
    return step > phase_boundary(total_steps)


def _lerp(a: float, b: float, t: float) -> float:
    return a * (1.0 - t) + b * t  # exact at t = 0 and t = 1


def keep_fraction(step: int, total_steps: int, schedule: str | float = "reference") -> float:
    """Keep-top fraction x for the 0-based ``step`` of a run of ``total_steps`` optimizer steps."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not isinstance(schedule, str):
        x = float(schedule)
        if not 0 < x <= 1:
            raise ValueError(f"a constant keep fraction must lie in (0, 1], got {schedule}")
        return x
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES} or a float, got {schedule!r}")
    step = min(max(int(step), 0), total_steps - 1)
    b = phase_boundary(total_steps)
    if step <= b:
        return KEEP_START if b == 0 else _lerp(KEEP_START, KEEP_MID, step / b)
    if schedule == "paper":
        return KEEP_END
    return _lerp(KEEP_MID, KEEP_END, (step - b) / (total_steps - 1 - b))


def top_threshold(a: torch.Tensor, fraction: float) -> torch.Tensor:
    """sigma such that the entries of ``a`` strictly above it are (at most) the top
    k = clamp(ceil(fraction * n), 1, n); 0-d float32. k = n gives -inf (everything passes)."""
    flat = a.reshape(-1).float()
    n = flat.numel()
    k = min(n, max(1, math.ceil(fraction * n - 1e-6)))
    if k >= n:
        return flat.new_tensor(float("-inf"))
    if 8 * (k + 1) <= n:  # the (n-k)-th smallest is the (k+1)-th largest: a small top-k is ~3x faster
        return flat.topk(k + 1, sorted=False).values.min()
    return flat.kthvalue(n - k).values


def top_thresholds(arrays: list[torch.Tensor], fraction: float) -> list[torch.Tensor]:
    """:func:`top_threshold` of each of ``arrays``; arrays of one size (on one device) on the small top-k
    path share one batched top-k over their stacked rows (the same values: each row's own k + 1 largest)."""
    out: list[torch.Tensor | None] = [None] * len(arrays)
    by_size: dict = {}
    for i, a in enumerate(arrays):
        by_size.setdefault((a.numel(), a.device), []).append(i)
    for (n, _dev), idx in by_size.items():
        k = min(n, max(1, math.ceil(fraction * n - 1e-6)))
        if len(idx) > 1 and k < n and 8 * (k + 1) <= n:
            rows = torch.stack([arrays[i].reshape(-1).float() for i in idx])
            for i, v in zip(idx, rows.topk(k + 1, dim=1, sorted=False).values.amin(dim=1), strict=True):
                out[i] = v
        else:
            for i in idx:
                out[i] = top_threshold(arrays[i], fraction)
    return out


def _floats(ts: list[torch.Tensor]) -> list[float]:
    """0-d tensors (possibly on several devices) -> floats, with one transfer per device."""
    dev = ts[0].device
    return torch.stack([t.to(dev) for t in ts]).tolist()


class TSignSGD(Optimizer):
    """t-SignSGD over ternary tensors. ``total_steps`` is the run's real number of optimizer steps.

    The step counter lives in each param group (``group["step"]``) and round-trips through
    state_dict()/load_state_dict(). After each step ``last_stats`` holds: step, keep_fraction,
    grad_norm (None unless the guard was evaluated), guard (bool), sigma and moved (per tensor:
    threshold used and fraction of entries that changed), moved_total (fraction over all tensors).
    """

    def __init__(self, params, total_steps: int, schedule: str | float = "reference", tau: float = TAU,
                 outlier_guard: bool = True, guard_norm: float = GUARD_NORM,
                 guard_quantile: float = GUARD_QUANTILE):
        keep_fraction(0, total_steps, schedule)  # validates
        defaults = dict(total_steps=int(total_steps), schedule=schedule, tau=float(tau),
                        outlier_guard=bool(outlier_guard), guard_norm=float(guard_norm),
                        guard_quantile=float(guard_quantile), step=0)
        super().__init__(params, defaults)
        self.last_stats: dict = {}

    @property
    def step_count(self) -> int:
        return int(self.param_groups[0]["step"]) if self.param_groups else 0

    def _global_grad_norm(self) -> torch.Tensor:
        sq = [p.grad.float().square().sum() for g in self.param_groups for p in g["params"]
              if p.grad is not None]
        return torch.stack([t.to(sq[0].device) for t in sq]).sum().sqrt() if sq else torch.zeros(())

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        phase2 = [g["outlier_guard"] and in_phase2(g["step"], g["total_steps"]) for g in self.param_groups]
        norm = self._global_grad_norm() if any(phase2) else None
        norm_value = None if norm is None else float(norm)
        names, sigmas, moved, sizes = [], [], [], []
        stats: dict = {"step": self.step_count}
        for gi, group in enumerate(self.param_groups):
            t = group["step"]
            frac = keep_fraction(t, group["total_steps"], group["schedule"])
            guard = phase2[gi] and norm_value > group["guard_norm"]
            if gi == 0:
                stats.update(keep_fraction=frac, guard=guard)
            pnames = group.get("param_names")
            live = [(pi, p) for pi, p in enumerate(group["params"]) if p.grad is not None]
            if any(p.grad.is_sparse for _, p in live):
                raise RuntimeError("TSignSGD does not support sparse gradients")
            buckets: dict = {}  # tensors of one size share one batched top-k (top_thresholds)
            for pi, p in live:
                buckets.setdefault((p.numel(), p.device), []).append((pi, p))
            done = {}
            for bucket in buckets.values():
                grads = [p.grad.abs().float() for _, p in bucket]
                for (pi, p), a, sigma in zip(bucket, grads, top_thresholds(grads, frac), strict=True):
                    select = a > sigma.clamp(min=group["tau"])
                    if guard:
                        select &= a <= top_threshold(a, 1.0 - group["guard_quantile"])
                    step = torch.sign(p.grad).to(p.dtype) * select
                    new = (p - step).clamp_(-1, 1).round_()
                    done[pi] = (sigma, (new != p).sum(), p.numel())
                    p.copy_(new)
            for pi, _p in live:  # the statistics in parameter order
                names.append(pnames[pi] if pnames else f"g{gi}.p{pi}")
                sigmas.append(done[pi][0])
                moved.append(done[pi][1])
                sizes.append(done[pi][2])
            group["step"] = t + 1
        stats["grad_norm"] = norm_value
        if names:
            sig, mv = _floats(sigmas), _floats(moved)
            stats["sigma"] = dict(zip(names, sig, strict=True))
            stats["moved"] = {n: m / s for n, m, s in zip(names, mv, sizes, strict=True)}
            stats["moved_total"] = sum(mv) / sum(sizes)
        else:
            stats.update(sigma={}, moved={}, moved_total=0.0)
        self.last_stats = stats
        return loss
