"""Ternary adaptation: init, markers with the boundary check, offset factor, forward and the custom
backward, each against independent float64 references: the vectorised formulas of tests/reference.py
and the plain loops / dense autograd written here."""

from __future__ import annotations

import math

import pytest
import torch
from layers import random_qlinear
from reference import effective_weight, markers, offset_factor, ste_grad_dW
from torch import nn

from lotaqaf_cli.core.qlinear import QuantLinear
from lotaqaf_cli.core.quant import pack_rows_padded
from lotaqaf_cli.core.ternary import (
    TernaryLinear,
    attach_ternary_adapters,
    marker_entries,
    ternary_init_A,
)

GRANS = ["group", "channel", "tensor", "none"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ternary(shape, gen, p_zero=0.4):
    u = torch.rand(shape, generator=gen)
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    return torch.where(u < p_zero, 0.0, sign)


def _g_idx(d_in: int, gs: int, act_order: bool, gen) -> torch.Tensor:
    if not act_order:
        return torch.arange(d_in, dtype=torch.int32) // gs
    perm = torch.randperm(d_in, generator=gen)
    g = torch.empty(d_in, dtype=torch.int32)
    g[perm] = (torch.arange(d_in) // gs).to(torch.int32)  # row perm[k] sits in group k // gs
    return g


def _base(d_in=16, d_out=12, bits=3, gs=4, act_order=False, bias=False, seed=0) -> QuantLinear:
    """Integer zero points (as a GPTQ checkpoint holds them); both code boundaries occur."""
    return random_qlinear(d_in, d_out, bits, gs, seed=seed, act_order=act_order, bias=bias, zeros="integer",
                          scales=(0.01, 0.1), edge_codes=True)


# ----------------------------------------------------------------------------------------------
# Independent float64 references
# ----------------------------------------------------------------------------------------------

def ref_markers(dW, omega, codes, bits):
    maxq = 2**bits - 1
    w = torch.zeros_like(dW)
    blocked = 0
    for i in range(dW.shape[0]):
        for j in range(dW.shape[1]):
            v, c = float(dW[i, j]), int(codes[i, j])
            if v > omega:
                if c == maxq:
                    blocked += 1
                else:
                    w[i, j] = 1.0
            elif v < -omega:
                if c == 0:
                    blocked += 1
                else:
                    w[i, j] = -1.0
    return w, blocked


def ref_mu_loops(dW, W_hat, omega, g_idx, gran, n_groups):
    """Plain Python loops in float64."""
    d_in, d_out = dW.shape
    R = [[float(dW[i, j]) - omega * float(W_hat[i, j]) for j in range(d_out)] for i in range(d_in)]
    if gran == "none":
        return None
    if gran == "tensor":
        return torch.tensor([[sum(sum(row) for row in R) / (d_in * d_out) / omega]], dtype=torch.float64)
    if gran == "channel":
        return torch.tensor([[sum(R[i][j] for i in range(d_in)) / d_in / omega for j in range(d_out)]],
                            dtype=torch.float64)
    out = torch.zeros(n_groups, d_out, dtype=torch.float64)
    for g in range(n_groups):
        rows = [i for i in range(d_in) if int(g_idx[i]) == g]
        for j in range(d_out):
            out[g, j] = sum(R[i][j] for i in rows) / len(rows) / omega
    return out


def ref_forward(x, A, B, base, omega, gran):
    """float64 W_eff with straight-through markers and mu through R = dW - omega * W_hat.detach()."""
    dW = A @ B
    w_hat, _ = ref_markers(dW.detach(), omega, base.codes, base.bits)
    w_ste = dW + (w_hat - dW).detach()
    R = dW - omega * w_hat
    g = base.g_idx.long()
    d_in = dW.shape[0]
    if gran == "group":
        n_groups = base.scales.shape[0]
        onehot = torch.zeros(n_groups, d_in, dtype=torch.float64)
        onehot[g, torch.arange(d_in)] = 1.0
        avg = onehot / onehot.sum(dim=1, keepdim=True)
        mu_rows = (avg @ R / omega)[g]
    elif gran == "channel":
        mu_rows = R.mean(dim=0, keepdim=True) / omega
    elif gran == "tensor":
        mu_rows = R.mean() / omega
    else:
        mu_rows = 0.0
    s, z = base.scales.double()[g], base.zeros.double()[g]
    w_eff = s * (base.codes.double() - z + w_ste + mu_rows)
    y = x @ w_eff
    if base.bias is not None:
        y = y + base.bias.double()
    return y, w_eff


# ----------------------------------------------------------------------------------------------
# Init
# ----------------------------------------------------------------------------------------------

def test_init_statistics():
    A = ternary_init_A(4096, 64, generator=_gen(1))
    assert A.shape == (4096, 64) and A.dtype == torch.float32
    assert set(A.unique().tolist()) <= {-1.0, 0.0, 1.0}
    # |X| <= 0.75 E|X| for X ~ N(0, s^2): E|X| = s sqrt(2/pi), so P = erf(0.75 sqrt(2/pi) / sqrt(2)).
    p_zero = math.erf(0.75 * math.sqrt(2 / math.pi) / math.sqrt(2))
    assert abs(p_zero - 0.4501) < 1e-3
    assert abs(float((A == 0).float().mean()) - p_zero) < 0.01
    assert abs(float((A == 1).float().mean()) - float((A == -1).float().mean())) < 0.01
    assert torch.equal(A, ternary_init_A(4096, 64, generator=_gen(1)))


def test_zero_B_is_noop():
    base = _base(bias=True, act_order=True)
    layer = TernaryLinear(base, rank=8, omega=2.0, generator=_gen(2))
    assert torch.count_nonzero(layer.B_T) == 0
    assert layer.A_T.requires_grad and layer.B_T.requires_grad
    assert not any(p.requires_grad for p in layer.base.parameters())
    x = torch.randn(3, 5, 16, generator=_gen(3))
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Markers and the boundary check
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4])
def test_markers_respect_boundary(bits):
    gen = _gen(bits)
    maxq = 2**bits - 1
    d_in, d_out, r, omega = 24, 10, 6, 1.5
    codes = torch.randint(0, maxq + 1, (d_in, d_out), generator=gen, dtype=torch.uint8)
    codes[:4] = 0
    codes[4:8] = maxq
    dW = _ternary((d_in, r), gen) @ _ternary((r, d_out), gen)
    dW[:2] = -5.0  # pushes code 0 below the grid
    dW[4:6] = 5.0  # pushes code maxq above it
    expect, expect_blocked = ref_markers(dW, omega, codes, bits)
    assert expect_blocked >= 2 * 2 * d_out
    w_hat, blocked = markers(dW, omega, codes < maxq, codes > 0, return_blocked=True)
    assert w_hat.dtype == torch.int8
    assert torch.equal(w_hat.double(), expect)
    assert blocked == expect_blocked
    moved = codes.int() + w_hat.int()
    assert int(moved.min()) >= 0 and int(moved.max()) <= maxq
    # the layer's sparse markers, the boundary read from the packed codes
    idx, val, n_blocked = marker_entries(dW, omega, pack_rows_padded(codes, bits), bits)
    dense = torch.zeros(codes.shape, dtype=torch.float64)
    dense.view(-1)[idx] = val.double()
    assert val.dtype == torch.int8 and torch.equal(dense, expect) and int(n_blocked) == expect_blocked
    unchecked = markers(dW, omega)
    torch.testing.assert_close(unchecked.double(), torch.sign(dW).double() * (dW.abs() > omega).double())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_layer_markers_and_stats(bits):
    base = _base(d_in=16, d_out=12, bits=bits, gs=4, act_order=True, seed=bits)
    layer = TernaryLinear(base, rank=6, omega=1.5)
    gen = _gen(10 + bits)
    with torch.no_grad():
        layer.A_T.copy_(_ternary((16, 6), gen, p_zero=0.1))
        layer.B_T.copy_(_ternary((6, 12), gen, p_zero=0.1))
    dW = (layer.A_T @ layer.B_T).detach().double()
    expect, expect_blocked = ref_markers(dW, 1.5, base.codes, bits)
    w_hat, mu = layer.markers_and_offset()
    assert torch.equal(w_hat.double(), expect)
    moved = base.codes.int() + w_hat.int()
    assert int(moved.min()) >= 0 and int(moved.max()) <= 2**bits - 1
    st = layer.marker_stats()
    assert st["plus"] == int((expect == 1).sum()) and st["minus"] == int((expect == -1).sum())
    assert st["zero"] == int((expect == 0).sum()) and st["blocked"] == expect_blocked > 0
    codes = base.codes
    assert st["boundary_codes"] == int((codes == 0).sum() + (codes == 2**bits - 1).sum())
    assert st["total"] == 16 * 12


def test_boundary_follows_loaded_codes():
    """The boundary check reads the base's codes as they are now: after load_state_dict brings other
    codes, markers are suppressed where the new codes sit at the edge of the grid."""
    layer = TernaryLinear(_base(bits=2, seed=40), rank=4, omega=1.5)
    other = TernaryLinear(_base(bits=2, seed=41), rank=4, omega=1.5)
    with torch.no_grad():
        other.A_T.copy_(_ternary((16, 4), _gen(5), p_zero=0.0))
        other.B_T.copy_(_ternary((4, 12), _gen(6), p_zero=0.0))
    layer.load_state_dict(other.state_dict())
    dW = (other.A_T @ other.B_T).detach().double()
    expect, expect_blocked = ref_markers(dW, 1.5, other.base.codes, 2)
    assert expect_blocked > 0
    w_hat, _ = layer.markers_and_offset()
    assert torch.equal(w_hat.double(), expect)


# ----------------------------------------------------------------------------------------------
# Offset factor
# ----------------------------------------------------------------------------------------------

def _layer_markers_mu(A, B, g_idx, n_groups, omega, gran):
    """The layer's (W_hat, mu) for dW = A @ B, on a base whose codes (all 1, 2 bits) block no marker."""
    d_in, d_out = A.shape[0], B.shape[1]
    base = QuantLinear.from_quantized(torch.ones(d_in, d_out, dtype=torch.uint8), torch.ones(n_groups, d_out),
                                      torch.ones(n_groups, d_out), g_idx, 2, d_in // n_groups)
    layer = TernaryLinear(base, rank=A.shape[1], omega=omega, offset_granularity=gran)
    with torch.no_grad():
        layer.A_T.copy_(A)
        layer.B_T.copy_(B)
    return layer.markers_and_offset()


@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("act_order", [False, True])
def test_offset_factor_matches_loops(gran, act_order):
    gen = _gen(5)
    d_in, d_out, r, gs, omega = 12, 5, 4, 4, 1.5
    g_idx = _g_idx(d_in, gs, act_order, gen)
    A, B = _ternary((d_in, r), gen), _ternary((r, d_out), gen)
    dW = A @ B
    w_hat = markers(dW, omega)
    mu = offset_factor(dW, w_hat, omega, g_idx, gran)
    ref = ref_mu_loops(dW, w_hat, omega, g_idx, gran, d_in // gs)
    layer_w_hat, layer_mu = _layer_markers_mu(A, B, g_idx, d_in // gs, omega, gran)
    assert torch.equal(layer_w_hat, w_hat)
    if gran == "none":
        assert mu is None
        assert layer_mu is None
        return
    expected_shape = {"group": (3, d_out), "channel": (1, d_out), "tensor": (1, 1)}[gran]
    assert tuple(mu.shape) == expected_shape
    torch.testing.assert_close(mu.double(), ref, rtol=1e-6, atol=1e-6)
    assert tuple(layer_mu.shape) == expected_shape and layer_mu.dtype == torch.float32
    torch.testing.assert_close(layer_mu.double(), ref, rtol=1e-6, atol=1e-6)


def test_offset_factor_uneven_groups():
    gen = _gen(6)
    g_idx = torch.tensor([2, 0, 0, 1, 2, 2, 0], dtype=torch.int32)  # sizes 3, 1, 3
    dW = torch.randint(-3, 4, (7, 4), generator=gen).float()
    w_hat = markers(dW, 1.0)
    mu = offset_factor(dW, w_hat, 1.0, g_idx, "group")
    torch.testing.assert_close(mu.double(), ref_mu_loops(dW, w_hat, 1.0, g_idx, "group", 3))
    _, layer_mu = _layer_markers_mu(torch.eye(7), dW, g_idx, 3, 1.0, "group")  # A_T = I: dW itself
    torch.testing.assert_close(layer_mu.double(), ref_mu_loops(dW, w_hat, 1.0, g_idx, "group", 3))


# ----------------------------------------------------------------------------------------------
# Forward and custom backward vs float64 autograd
# ----------------------------------------------------------------------------------------------

def _trained_layer(base, rank, omega, gran, seed):
    layer = TernaryLinear(base, rank=rank, omega=omega, offset_granularity=gran, generator=_gen(seed))
    with torch.no_grad():
        layer.B_T.copy_(_ternary(tuple(layer.B_T.shape), _gen(seed + 1), p_zero=0.2))
    return layer


@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_backward_match_float64_autograd(gran, act_order, bias):
    base = _base(d_in=16, d_out=12, bits=2, gs=4, act_order=act_order, bias=bias, seed=7)
    omega = 1.5
    layer = _trained_layer(base, 6, omega, gran, seed=8)
    x = torch.randn(2, 3, 16, generator=_gen(9), requires_grad=True)
    up = torch.randn(2, 3, 12, generator=_gen(10))

    y = layer(x)
    (y * up).sum().backward()
    assert layer.marker_stats()["plus"] + layer.marker_stats()["minus"] > 0

    x64 = x.detach().double().requires_grad_(True)
    A64 = layer.A_T.detach().double().requires_grad_(True)
    B64 = layer.B_T.detach().double().requires_grad_(True)
    y64, w_eff = ref_forward(x64, A64, B64, base, omega, gran)
    (y64 * up.double()).sum().backward()

    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.double(), y64.detach(), **tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    torch.testing.assert_close(layer.A_T.grad.double(), A64.grad, **tol)
    torch.testing.assert_close(layer.B_T.grad.double(), B64.grad, **tol)
    torch.testing.assert_close(effective_weight(base, layer.A_T, layer.B_T, omega, gran), w_eff.detach(),
                               rtol=1e-12, atol=1e-12)
    G = x64.detach().reshape(-1, 16).t() @ up.double().reshape(-1, 12)
    d_dw = ste_grad_dW(G, base, omega, gran)  # the method page's straight-through gradient
    torch.testing.assert_close(d_dw @ B64.detach().t(), A64.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(A64.detach().t() @ d_dw, B64.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("r", [1, 64, 256, 300])
def test_auxiliary_product_is_exact(r):
    """dW = A_T @ B_T is formed in bf16 up to r = 256: exact, also where every partial sum is largest."""
    from lotaqaf_cli.core.ternary import auxiliary_product

    A, B = _ternary((40, r), _gen(r), p_zero=0.3), _ternary((r, 24), _gen(r + 1), p_zero=0.3)
    A[0], B[:, 0] = 1.0, 1.0  # dW[0, 0] = r
    dW = auxiliary_product(A, B)
    assert dW.dtype == torch.float32 and float(dW[0, 0]) == r
    assert torch.equal(dW.double(), A.double() @ B.double())


@pytest.mark.parametrize("gran", ["group", "none"])
def test_per_group_gradients_match_float64(gran):
    """Rank below half the group size: dL/dA_T and dL/dB_T are formed group by group without the dense
    G = x^T dy; they equal the method page's straight-through gradient (float64 reference)."""
    base = _base(d_in=256, d_out=40, bits=3, gs=64, seed=21)
    omega = 3.0
    layer = _trained_layer(base, 4, omega, gran, seed=22)
    assert layer._per_group_grads_pay(50) and not TernaryLinear(base, 64, 48.0)._per_group_grads_pay(50)
    x = torch.randn(50, 256, generator=_gen(23), dtype=torch.float64)
    dy = torch.randn(50, 40, generator=_gen(24), dtype=torch.float64)
    layer(x.float()).backward(dy.float())
    d_dw = ste_grad_dW(x.t() @ dy, base, omega, gran)
    torch.testing.assert_close(layer.A_T.grad.double(), d_dw @ layer.B_T.detach().double().t(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.B_T.grad.double(), layer.A_T.detach().double().t() @ d_dw, rtol=1e-4, atol=1e-4)


def test_group_gradient_is_the_papers_formula():
    """dL/d dW = s * (G + sum over the group of G / (omega * gs)) with G = x^T dy."""
    base = _base(d_in=16, d_out=12, bits=4, gs=4, seed=11)
    omega = 2.0
    layer = _trained_layer(base, 5, omega, "group", seed=12)
    x = torch.randn(7, 16, generator=_gen(13), dtype=torch.float64)
    dy = torch.randn(7, 12, generator=_gen(14), dtype=torch.float64)
    layer(x.float()).backward(dy.float())
    G = x.t() @ dy
    gsum = G.view(4, 4, 12).sum(dim=1, keepdim=True).expand(4, 4, 12).reshape(16, 12)
    s = base.scales.double().repeat_interleave(4, dim=0)
    d_dw = s * (G + gsum / (omega * 4))
    torch.testing.assert_close(ste_grad_dW(G, base, omega, "group"), d_dw, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.A_T.grad.double(), d_dw @ layer.B_T.detach().double().t(),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.B_T.grad.double(), layer.A_T.detach().double().t() @ d_dw,
                               rtol=1e-5, atol=1e-5)


def test_bf16_input():
    base = _base(d_in=16, d_out=12, bits=4, gs=4, act_order=True, bias=True, seed=15)
    layer = _trained_layer(base, 6, 1.5, "group", seed=16)
    x = torch.randn(4, 16, generator=_gen(17))
    y32 = layer(x)
    xb = x.bfloat16().requires_grad_(True)
    yb = layer(xb)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), y32, rtol=3e-2, atol=3e-2)
    yb.float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16
    assert layer.A_T.grad.dtype == torch.float32 and torch.isfinite(layer.B_T.grad).all()


def test_no_dense_tensor_saved_for_backward():
    base = _base(d_in=16, d_out=12, bits=3, gs=4, seed=18)
    layer = _trained_layer(base, 6, 1.5, "group", seed=19)
    x = torch.randn(5, 16, requires_grad=True)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    # x, A_T, B_T and the sparse markers (flat indices and values: one entry per non-zero marker)
    n_markers = int((layer.markers_and_offset()[0] != 0).sum())
    assert n_markers > 0
    assert sorted(shapes) == sorted([(5, 16), (16, 6), (6, 12), (n_markers,), (n_markers,)])


def test_no_grad_needed_for_x():
    base = _base(seed=20)
    layer = _trained_layer(base, 6, 1.5, "group", seed=21)
    layer(torch.randn(3, 16)).sum().backward()
    assert layer.A_T.grad is not None and layer.B_T.grad is not None


# ----------------------------------------------------------------------------------------------
# Attaching to a model
# ----------------------------------------------------------------------------------------------

class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = _base(seed=30)
        self.up_proj = _base(seed=31)
        self.my_q_proj = _base(seed=32)  # the name ends in "q_proj" only as a substring


def test_attach_ternary_adapters():
    model = nn.Module()
    model.layers = nn.ModuleList([_Block(), _Block()])
    model.lm_head = _base(seed=33)
    names = attach_ternary_adapters(model, rank=8, omega=6, target_modules=["q_proj", "up_proj"],
                                    generator=_gen(34))
    assert names == ["layers.0.q_proj", "layers.0.up_proj", "layers.1.q_proj", "layers.1.up_proj"]
    for n in names:
        assert isinstance(model.get_submodule(n), TernaryLinear)
    assert isinstance(model.layers[0].my_q_proj, QuantLinear) and isinstance(model.lm_head, QuantLinear)
    assert attach_ternary_adapters(model, 8, 6, target_modules=["q_proj"]) == []  # already wrapped
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 8 and all(n.endswith(("A_T", "B_T")) for n in trainable)


@pytest.mark.parametrize("rank,omega,gran", [(8, 0, "group"), (8, 8, "group"), (8, -1, "group"),
                                             (0, 0.5, "group"), (8, 4, "row")])
def test_attach_validation(rank, omega, gran):
    model = nn.Module()
    model.q_proj = _base()
    with pytest.raises(ValueError):
        attach_ternary_adapters(model, rank=rank, omega=omega, offset_granularity=gran)
    assert isinstance(model.q_proj, QuantLinear)


@pytest.mark.parametrize("gran", ["group", "tensor"])
def test_markers_disabled_is_the_offset_factor_alone(gran):
    """adapter.markers=false (the ablation): W_hat = 0 in the forward and in markers_and_offset,
    mu = pooled dW / omega, against the float64 reference; with markers on the same adapter moves codes."""
    base = _base(d_in=16, d_out=12, bits=2, gs=4, seed=7)
    omega = 1.5
    on = _trained_layer(base, 6, omega, gran, seed=8)
    off = TernaryLinear(base, 6, omega, gran, markers=False)
    off.load_state_dict(on.state_dict())
    assert on.marker_stats()["plus"] + on.marker_stats()["minus"] > 0  # the test can tell the two apart
    assert off.marker_stats()["plus"] + off.marker_stats()["minus"] == 0
    x = torch.randn(3, 16, generator=_gen(9), dtype=torch.float64)
    ref = effective_weight(base, off.A_T, off.B_T, omega, gran, use_markers=False)
    torch.testing.assert_close(off(x.float()).double(), x @ ref, rtol=1e-5, atol=1e-5)
    w_hat, mu = off.markers_and_offset()
    assert not w_hat.any()
    dW = off.A_T.detach().double() @ off.B_T.detach().double()
    expect = dW.view(4, 4, 12).mean(dim=1) / omega if gran == "group" else dW.mean().view(1, 1) / omega
    torch.testing.assert_close(mu.double(), expect, rtol=1e-6, atol=1e-7)
    assert "markers=False" in repr(off)


@pytest.mark.parametrize("act_order", [False, True])
def test_markers_formed_in_few_columns_match_the_dense_reference(act_order):
    """The CPU path forms dW only in the columns whose bound |dW| <= min(max|A| ||B_j||_1, max ||A_i||_1
    max|B_j|) exceeds omega: here 3 dense columns of B out of 40 (the rest too sparse to cross), with
    edge codes so that the boundary blocks some markers; markers, blocked count and mu against float64."""
    gen = _gen(11)
    d_in, d_out, r, gs, omega = 64, 40, 12, 16, 6.0
    base = random_qlinear(d_in, d_out, 2, gs, seed=3, act_order=act_order, edge_codes=True)
    layer = TernaryLinear(base, rank=r, omega=omega, generator=gen)
    B = _ternary((r, d_out), gen, p_zero=0.85)
    B[:, 1] = 1.0                                                   # columns that can cross omega
    B[:, 17] = -1.0
    B[:, 30] = _ternary((r,), gen, p_zero=0.0)
    with torch.no_grad():
        layer.B_T.copy_(B)
        layer.A_T.copy_(_ternary((d_in, r), gen, p_zero=0.1))
    dW = layer.A_T.detach().double() @ B.double()
    assert (dW.abs() > omega).any() and not (dW[:, [c for c in range(d_out) if c not in (1, 17, 30)]].abs() > omega).any()
    codes = base.codes
    w_hat, blocked = markers(dW, omega, codes < 3, codes > 0, return_blocked=True)
    w, mu = layer.markers_and_offset()
    assert blocked > 0 and layer.marker_stats()["blocked"] == blocked
    assert torch.equal(w.double(), w_hat)
    mu_ref = offset_factor(dW, w_hat, omega, base.g_idx, "group", num_groups=base.scales.shape[0])
    torch.testing.assert_close(mu.double(), mu_ref, rtol=1e-7, atol=1e-9)
