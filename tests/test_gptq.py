"""GPTQ against independent references: the Hessian formula, the diagonal-Hessian case, RTN."""

import copy

import pytest
import torch

from lotaqaf_cli.core.gptq import HessianAccumulator, gptq_quantize, output_error
from lotaqaf_cli.core.qlinear import QuantLinear
from lotaqaf_cli.core.quant import dequantize, rtn_quantize
from lotaqaf_cli.core.quantize_model import quantize_model


def test_hessian_is_two_over_n_xtx():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 16, generator=g)
    acc = HessianAccumulator(16)
    for b in x:
        acc.add_batch(b)
    flat = x.reshape(-1, 16).double()
    ref = 2.0 / flat.shape[0] * flat.T @ flat
    assert torch.allclose(acc.H.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_diagonal_hessian_reduces_to_rtn(bits):
    """With H = c*I no error is propagated, so GPTQ must give exactly the RTN codes."""
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(24, 64, generator=g)
    res = gptq_quantize(W, 3.0 * torch.eye(64), bits, 32, static_groups=True)
    codes, scales, zeros, g_idx = rtn_quantize(W.t(), bits, 32)
    assert torch.equal(res.codes, codes) and torch.equal(res.scales, scales) and torch.equal(res.zeros, zeros)


def test_output_error_matches_direct_computation():
    g = torch.Generator().manual_seed(1)
    W, X = torch.randn(8, 32, generator=g), torch.randn(100, 32, generator=g)
    Wq = W + 0.1 * torch.randn(8, 32, generator=g)
    H = 2.0 / 100 * X.T @ X
    direct = ((X @ (W - Wq).T) ** 2).sum() / ((X @ W.T) ** 2).sum()
    assert abs(output_error(W, Wq, H) - direct.item()) < 1e-5


@pytest.mark.parametrize("act_order", [False, True])
def test_act_order_g_idx_groups(act_order):
    g = torch.Generator().manual_seed(2)
    W, X = torch.randn(16, 64, generator=g), torch.randn(200, 64, generator=g) * torch.linspace(0.1, 3, 64)
    res = gptq_quantize(W, 2 / 200 * X.T @ X, 4, 16, act_order=act_order)
    assert torch.bincount(res.g_idx.long()).tolist() == [16, 16, 16, 16]
    if act_order:  # columns with the largest Hessian diagonal come first -> group 0
        assert set(res.g_idx[-16:].tolist()) == {0}
    q = QuantLinear.from_quantized(res.codes, res.scales, res.zeros, res.g_idx, 4, 16)
    assert torch.allclose(q.dequantize(), dequantize(res.codes, res.scales, res.zeros, res.g_idx))


@pytest.mark.parametrize("bits,act_order,true_seq", [(2, False, False), (3, False, True), (4, True, False),
                                                     (4, False, False), (8, False, False)])
def test_gptq_never_worse_than_rtn_on_tiny_model(smoke, calib_ids, bits, act_order, true_seq):
    ref = copy.deepcopy(smoke)
    stats = quantize_model(smoke, list(calib_ids.split(4)), bits=bits, group_size=32, act_order=act_order,
                           true_sequential=true_seq)
    assert len(stats) == 2 * 7
    for s in stats:
        assert s.gptq_error <= s.rtn_error + 1e-9, s
    assert all(isinstance(m, QuantLinear) for n, m in smoke.named_modules() if n.endswith("proj"))
    with torch.no_grad():  # the quantized model still computes something close to the original
        a, b = smoke(calib_ids).logits, ref(calib_ids).logits
    rel = ((a - b).norm() / b.norm()).item()
    assert rel < {2: 1.0, 3: 0.5, 4: 0.25, 8: 0.02}[bits]


def test_group_size_check_names_layer(smoke):
    from omegaconf import OmegaConf

    from lotaqaf_cli.errors import LotaqafError
    from lotaqaf_cli.stages.quantize import check_model

    check_model(smoke, OmegaConf.create({"group_size": 32, "bits": 4}))
    with pytest.raises(LotaqafError, match=r"does not divide the input size 64 of model\.layers\.0\.self_attn"):
        check_model(smoke, OmegaConf.create({"group_size": 48, "bits": 4}))


def test_group_aware_order_by_hand():
    """Groups by their largest diagonal entry, then each group's columns by decreasing diagonal."""
    from lotaqaf_cli.core.gptq import group_aware_order

    diag = torch.tensor([1.0, 5.0, 2.0, 0.0, 9.0, 3.0, 4.0, 4.0, 0.5])
    # group maxima 5, 9, 4 -> groups 1, 0, 2; the tie 4 = 4 in group 2 keeps the column order
    assert group_aware_order(diag, 3).tolist() == [4, 5, 3, 1, 2, 0, 6, 7, 8]
    assert group_aware_order(diag, -1).tolist() == torch.argsort(diag, descending=True, stable=True).tolist()


def reference_gptq64(W, H, bits, gs, order, *, block_size, damp_percent=0.01):
    """GPTQ written out in float64 as sequential optimal-brain-surgeon steps, without the Cholesky
    factor or lazy blocks: the k-th visited column is rounded and its error is spread over the columns
    not yet visited through the inverse of their Hessian, inverted anew at every step. A group's
    min-max grid comes from its weights as they stood when the visit reached the start of the block
    (``block_size`` visits) holding the group's first column. Returns (codes [out, in], scale and zero
    per visited group, in visiting order)."""
    W, H = W.double().clone(), H.double().clone()
    H += damp_percent * H.diag().mean() * torch.eye(H.shape[0], dtype=torch.float64)
    maxq = 2**bits - 1
    codes = torch.zeros_like(W)
    grids, snapshot = [], None
    for k, j in enumerate(order.tolist()):
        if k % block_size == 0:
            snapshot = W.clone()
        if k % gs == 0:
            cols = order[k:k + gs]
            lo = snapshot[:, cols].amin(1).clamp(max=0)
            hi = snapshot[:, cols].amax(1).clamp(min=0)
            scale = ((hi - lo) / maxq).half().double()  # lotaqaf's grid: fp16 scales, integer zero points
            zero = torch.round(-lo / scale).clamp(0, maxq)
            grids.append((scale, zero))
        codes[:, j] = torch.clamp(torch.round(W[:, j] / scale) + zero, 0, maxq)
        rest = order[k:]
        Hinv = torch.linalg.inv(H[rest][:, rest])
        err = (W[:, j] - scale * (codes[:, j] - zero)) / Hinv[0, 0]
        W[:, rest] -= err[:, None] * Hinv[0][None, :]
    return codes, grids


@pytest.mark.parametrize("how", ["natural", "act_group_aware", "act_order"])
def test_gptq_matches_a_float64_reference(how):
    """Codes and grids against :func:`reference_gptq64` on a layer whose input scales vary, so that the
    visiting order matters; block 32 holds two groups of 16, so a grid taken from the columns' latest
    values (the defect of issue 26) differs from the block-start one."""
    from lotaqaf_cli.core.gptq import group_aware_order

    g = torch.Generator().manual_seed(5)
    W = torch.randn(24, 96, generator=g)
    X = torch.randn(400, 96, generator=g) * torch.rand(96, generator=g).mul(3).add(0.1)
    X[:, 7] *= 6  # one outlier channel
    H = 2 / 400 * X.T @ X
    res = gptq_quantize(W, H, 2, 16, block_size=32, act_order=how == "act_order",
                        act_group_aware=how == "act_group_aware")
    order = {"natural": torch.arange(96), "act_group_aware": group_aware_order(H.diag(), 16),
             "act_order": torch.argsort(H.diag(), descending=True)}[how]
    codes, grids = reference_gptq64(W, H, 2, 16, order, block_size=32)
    assert torch.equal(res.codes.t().double(), codes)
    for k, (scale, zero) in enumerate(grids):  # the grid of the k-th visited group sits at its group index
        g_of = k if how == "act_order" else int(order[16 * k]) // 16
        assert torch.equal(res.scales[g_of].double(), scale) and torch.equal(res.zeros[g_of].double(), zero)
    expected_g_idx = torch.argsort(order) // 16 if how == "act_order" else torch.arange(96) // 16
    assert torch.equal(res.g_idx.long(), expected_g_idx)
    if how != "natural":  # the order changes the result
        natural, _ = reference_gptq64(W, H, 2, 16, torch.arange(96), block_size=32)
        assert not torch.equal(codes, natural)
