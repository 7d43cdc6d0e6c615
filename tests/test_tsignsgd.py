"""t-SignSGD: hand-computed updates, clipping, tau, the keep-top schedules, the outlier guard and
state_dict round-trips."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lotaqaf_cli.core.tsignsgd import TSignSGD, keep_fraction, top_threshold


def _param(values):
    return nn.Parameter(torch.tensor(values, dtype=torch.float32))


def test_hand_computed_update():
    p = _param([[1.0, 0.0, -1.0, 0.0, 1.0], [0.0, -1.0, 1.0, 0.0, 0.0]])
    p.grad = torch.tensor([[0.5, -3.0, -0.2, 0.0, -1.0], [2.0, 0.1, 4.0, 1e-12, -0.05]])
    opt = TSignSGD([p], total_steps=10, schedule=0.3)  # keep top 3 of 10: |g| in {4, 3, 2}
    opt.step()
    assert p.tolist() == [[1.0, 1.0, -1.0, 0.0, 1.0], [-1.0, -1.0, 0.0, 0.0, 0.0]]
    assert opt.last_stats["sigma"]["g0.p0"] == 1.0  # 4th largest |g|
    assert opt.last_stats["moved"]["g0.p0"] == pytest.approx(0.3)


def test_scheduled_first_step_keeps_five_percent():
    p = nn.Parameter(torch.zeros(40))
    p.grad = -torch.arange(1.0, 41.0)  # top 5% of 40 = 2 entries: |g| = 40, 39
    opt = TSignSGD([p], total_steps=300)
    opt.step()
    expected = [0.0] * 38 + [1.0, 1.0]
    assert p.tolist() == expected
    assert opt.last_stats["keep_fraction"] == 0.05 and opt.last_stats["sigma"]["g0.p0"] == 38.0


def test_clipping():
    p = _param([1.0, -1.0, 1.0, -1.0])
    p.grad = torch.tensor([-5.0, 5.0, 6.0, -7.0])  # all selected with keep 1.0
    opt = TSignSGD([p], total_steps=10, schedule=1.0)
    opt.step()
    assert p.tolist() == [1.0, -1.0, 0.0, 0.0]
    assert opt.last_stats["moved"]["g0.p0"] == 0.5


def test_tau():
    p = nn.Parameter(torch.zeros(6))
    p.grad = torch.tensor([0.0, 1e-12, 5e-10, 1e-9, 2e-9, -3e-9])
    opt = TSignSGD([p], total_steps=10, schedule=1.0)
    opt.step()
    assert p.tolist() == [0.0, 0.0, 0.0, 0.0, -1.0, 1.0]  # only |g| > 1e-9 moves
    q = nn.Parameter(torch.zeros(100))
    q.grad = torch.zeros(100)  # zero gradient (A_T right after init): sigma = 0, tau stops everything
    TSignSGD([q], total_steps=10).step()
    assert torch.count_nonzero(q) == 0


def test_ties_and_tiny_tensors():
    p = nn.Parameter(torch.zeros(50))
    p.grad = torch.full((50,), 0.5)  # all tied: strict threshold, nothing moves
    TSignSGD([p], total_steps=10).step()
    assert torch.count_nonzero(p) == 0
    one = nn.Parameter(torch.zeros(1))
    one.grad = torch.tensor([-0.3])  # k = max(1, ceil(5% of 1)) = 1: the single entry moves
    TSignSGD([one], total_steps=10).step()
    assert one.tolist() == [1.0]


def test_top_threshold_selection():
    a = torch.tensor([0.1, 0.9, 0.4, 0.7, 0.2, 0.3, 0.8, 0.5, 0.6, 1.0])
    assert float(top_threshold(a, 0.2)) == pytest.approx(0.8)
    assert float(top_threshold(a, 0.001)) == pytest.approx(0.9)  # at least one kept
    assert float(top_threshold(a, 1.0)) == float("-inf")
    b = torch.arange(1.0, 101.0).bfloat16()
    assert float(top_threshold(b, 0.05)) == 95.0


@pytest.mark.parametrize("T", [300, 80, 117, 469])
def test_schedule_values(T):
    b = (4 * T) // 5
    for sched in ("reference", "paper"):
        assert keep_fraction(0, T, sched) == 0.05
        assert keep_fraction(b, T, sched) == 0.001
        assert keep_fraction(T - 1, T, sched) == 0.0001
        assert keep_fraction(T + 5, T, sched) == 0.0001
        assert keep_fraction(b // 2, T, sched) == pytest.approx(0.05 + (0.001 - 0.05) * (b // 2) / b)
        values = [keep_fraction(t, T, sched) for t in range(T)]
        assert all(v1 >= v2 for v1, v2 in zip(values, values[1:], strict=False))
    assert keep_fraction(b + 1, T, "paper") == 0.0001
    assert keep_fraction(b + 1, T, "reference") == pytest.approx(0.001 - 0.0009 / (T - 1 - b))
    if T == 300:
        assert b == 240
        assert keep_fraction(240, 300) == 0.001
        assert keep_fraction(270, 300) == pytest.approx(0.001 - 0.0009 * 30 / 59)


def test_schedule_validation():
    with pytest.raises(ValueError):
        keep_fraction(0, 0)
    with pytest.raises(ValueError):
        keep_fraction(0, 10, "cosine")
    with pytest.raises(ValueError):
        TSignSGD([nn.Parameter(torch.zeros(2))], total_steps=10, schedule=0.0)


def _guard_case(scale: float, step: int):
    p = nn.Parameter(torch.zeros(100))
    opt = TSignSGD([p], total_steps=10, schedule=0.03)  # keep top 3; b = 8, phase 2 = step 9
    opt.param_groups[0]["step"] = step
    p.grad = torch.arange(1.0, 101.0) * scale  # |g| top 3: 100, 99, 98 (times scale)
    opt.step()
    return p, opt


def test_outlier_guard():
    p, opt = _guard_case(1.0, step=9)  # phase 2, norm ~ 581 > 10: the top 0.005% (k = 1) is held back
    assert opt.last_stats["guard"] and opt.last_stats["grad_norm"] > 10
    assert torch.nonzero(p).flatten().tolist() == [97, 98] and p[97] == -1.0
    p, opt = _guard_case(1e-3, step=9)  # phase 2, norm 0.58 <= 10: no guard
    assert not opt.last_stats["guard"]
    assert torch.nonzero(p).flatten().tolist() == [97, 98, 99]
    p, opt = _guard_case(1.0, step=8)  # phase 1 (step b): no guard, norm not even computed
    assert not opt.last_stats["guard"] and opt.last_stats["grad_norm"] is None
    assert torch.nonzero(p).flatten().tolist() == [97, 98, 99]


def test_state_dict_roundtrip():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(8, 5, generator=gen) for _ in range(5)]

    def make():
        p = nn.Parameter(torch.zeros(8, 5))
        return p, TSignSGD([p], total_steps=5, schedule="paper")

    p1, o1 = make()
    for g in grads[:3]:
        p1.grad = g.clone()
        o1.step()
    assert o1.step_count == 3
    sd = o1.state_dict()
    p2, o2 = make()
    with torch.no_grad():
        p2.copy_(p1)
    o2.load_state_dict(sd)
    assert o2.step_count == 3
    for g in grads[3:]:
        p1.grad, p2.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
        assert o1.last_stats == o2.last_stats
        assert torch.equal(p1, p2)
    assert o2.step_count == 5 and o2.last_stats["step"] == 4


def test_named_params_and_bf16():
    a = nn.Parameter(torch.zeros(4, 3, dtype=torch.bfloat16))
    b = nn.Parameter(torch.zeros(3, 2))
    a.grad = torch.arange(12.0).view(4, 3).bfloat16()
    b.grad = -torch.arange(6.0).view(3, 2)
    opt = TSignSGD([("layer.A_T", a), ("layer.B_T", b)], total_steps=10, schedule=0.2)
    opt.step()
    assert set(opt.last_stats["sigma"]) == {"layer.A_T", "layer.B_T"}
    assert a.dtype == torch.bfloat16 and a.float().flatten().tolist() == [0.0] * 9 + [-1.0] * 3
    assert b.flatten().tolist() == [0.0] * 4 + [1.0] * 2
    assert opt.last_stats["moved_total"] == pytest.approx(5 / 18)


def test_top_threshold_equals_sorted_reference_with_ties():
    """Both selection paths (small top-k and kthvalue) give the (k+1)-th largest value, ties included."""
    import math

    from lotaqaf_cli.core.tsignsgd import top_threshold

    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        n = int(torch.randint(2, 3000, (1,), generator=g))
        x = torch.randint(0, 20, (n,), generator=g).float() if trial % 2 else torch.randn(n, generator=g).abs()
        ordered = sorted(x.tolist())
        for frac in (0.0001, 0.001, 0.01, 0.05, 0.2, 0.5, 0.9):
            k = min(n, max(1, math.ceil(frac * n - 1e-6)))
            want = float("-inf") if k >= n else ordered[n - k - 1]
            assert float(top_threshold(x, frac)) == want


def test_batched_thresholds_equal_one_by_one():
    """top_thresholds (one top-k over the stacked rows of same-size tensors) gives each tensor's own
    top_threshold, ties and both selection paths included, whatever the mix of sizes."""
    from lotaqaf_cli.core.tsignsgd import top_threshold, top_thresholds

    g = torch.Generator().manual_seed(3)
    arrays = [torch.randn(s, generator=g).abs() for s in [(40, 8), (8, 40), (40, 8), (13,), (40, 8), (8, 40)]]
    arrays += [torch.randint(0, 4, (40, 8), generator=g).float() for _ in range(3)]  # heavy ties
    for frac in (0.001, 0.01, 0.05, 0.3, 1.0):
        got = top_thresholds(arrays, frac)
        assert [float(v) for v in got] == [float(top_threshold(a, frac)) for a in arrays]
