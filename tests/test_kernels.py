"""lotaqaf_kernels against independent references: float64 dequantize-and-multiply written here from
the unpacked codes, the float64 markers of tests/reference.py, and the torch path. On this CPU-only
machine the Triton kernels run in triton's interpreter (conftest sets TRITON_INTERPRET=1); on a GPU
machine tests/test_cuda.py runs them compiled."""

from __future__ import annotations

import copy

import lotaqaf_kernels as kernels
import pytest
import torch
from layers import dense64, random_qlinear
from reference import markers as ref_markers
from reference import offset_factor

from lotaqaf_cli.core.qlinear import QuantLinear, quant_matmul
from lotaqaf_cli.core.ternary import TernaryLinear, attach_ternary_adapters

pytest.importorskip("triton")


def _layer(d_in, d_out, bits, gs, act_order=False, bias=False, seed=0):
    """A QuantLinear with random codes (both grid edges present), fractional zero points (a merged
    layer's z - mu) and, with act_order, rows scattered over the groups; also returns the codes (int64)
    and a float64 reference weight."""
    q = random_qlinear(d_in, d_out, bits, gs, seed=seed, act_order=act_order, bias=bias, zeros="fractional",
                       edge_codes=True)
    return q, q.codes.long(), dense64(q)


# widths x shapes: an odd group count (3), act-order, a 3-bit input size that is a multiple of 32 but
# not of 64 (96), an input size that is not whole 3-bit periods (40: padded rows), outputs that are
# not a multiple of the tile (70), bias; 1 row (the decode tiles) and 37 rows (the prefill tiles).
SHAPES = [(96, 40, 32, False, True), (160, 24, 16, True, False), (40, 70, 8, False, True), (64, 70, 64, True, True)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}g{s[2]}{'-act' if s[3] else ''}")
@pytest.mark.parametrize("rows", [1, 37])
def test_qmm_against_float64(bits, shape, rows, mode):
    d_in, d_out, gs, act, bias = shape
    q, _codes, w64 = _layer(d_in, d_out, bits, gs, act, bias, seed=bits * 100 + d_in)
    x = torch.randn(rows, d_in, generator=torch.Generator().manual_seed(rows))
    ref = x.double() @ w64 + (0 if q.bias is None else q.bias.double())
    mode("triton")
    y = q(x)
    mode("torch")
    y_torch = q(x)
    scale = ref.abs().max().item()
    assert (y.double() - ref).abs().max().item() <= 1e-5 * scale
    torch.testing.assert_close(y, y_torch, rtol=1e-5, atol=1e-5 * scale)


def test_marker_words_fields():
    """marker_words against a hand-decoded layout: row i, column j -> word i // 16, bits 2 * (i % 16),
    field 1 for +1, 3 for -1."""
    d_in, d_out = 40, 3
    idx = torch.tensor([0 * d_out + 0, 17 * d_out + 2, 15 * d_out + 1, 39 * d_out + 0])
    val = torch.tensor([1, -1, -1, 1], dtype=torch.int8)
    words = kernels.marker_words(idx, val, d_in, d_out)
    assert words.shape == (3, d_out) and words.dtype == torch.int32
    w = (words.to(torch.int64) & 0xFFFFFFFF).tolist()
    assert w[0][0] == 1 and w[1][2] == 3 << 2 and w[0][1] == 3 << 30 and w[2][0] == 1 << 14
    assert w[0][2] == w[1][0] == w[1][1] == w[2][1] == w[2][2] == 0


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_qmm_with_markers_equals_moved_codes(bits, mode):
    """The adapter hands the kernel codes + markers, the merged layer the moved codes: same bits."""
    q, codes, _ = _layer(96, 40, bits, 32, act_order=True, seed=bits)
    g = torch.Generator().manual_seed(7)
    flat = torch.randperm(96 * 40, generator=g)[:60]
    val = torch.where(codes.view(-1)[flat] == 0, 1, -1).to(torch.int8)  # stays on the grid
    moved = codes.clone().view(-1)
    moved[flat] += val.long()
    merged = QuantLinear.from_quantized(moved.view(96, 40), q.scales, q.zeros, q.g_idx, bits, 32)
    x = torch.randn(5, 96, generator=g)
    for m in ("triton", "torch"):
        mode(m)
        assert torch.equal(quant_matmul(x, q, markers=(flat, val)), merged(x)), m


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("gran", ["group", "channel", "tensor", "none"])
def test_ternary_step_against_float64(bits, gran, mode):
    """The Triton ternary step: markers with the boundary check equal the float64 reference exactly,
    mu to float32 rounding, the blocked count exactly (act-order groups, codes on both grid edges)."""
    q, codes, _ = _layer(96, 40, bits, 16, act_order=True, seed=bits)
    codes_edge = codes.clone()
    codes_edge[:8], codes_edge[8:16] = 0, 2**bits - 1
    q = QuantLinear.from_quantized(codes_edge, q.scales, q.zeros.round(), q.g_idx, bits, 16)
    layer = TernaryLinear(q, 6, 1.5, gran, generator=torch.Generator().manual_seed(bits))
    with torch.no_grad():
        layer.B_T.copy_(torch.randint(-1, 2, layer.B_T.shape, generator=torch.Generator().manual_seed(9)).float())
    dW = (layer.A_T @ layer.B_T).detach().double()
    maxq = 2**bits - 1
    w_hat, blocked = ref_markers(dW, 1.5, codes_edge < maxq, codes_edge > 0, return_blocked=True)
    mu_ref = offset_factor(dW, w_hat, 1.5, q.g_idx, gran, num_groups=q.scales.shape[0])
    mode("triton")
    idx, val, mu, n_blocked = layer._markers_mu(layer.A_T, layer.B_T)
    dense = torch.zeros(96 * 40, dtype=torch.float64)
    dense[idx] = val.double()
    assert blocked > 0 and int(n_blocked) == blocked
    assert torch.equal(dense.view(96, 40), w_hat.double())
    if gran == "none":
        assert mu is None
    else:
        torch.testing.assert_close(mu.double(), mu_ref, rtol=1e-6, atol=1e-7)


def test_merge_certificate_exact_with_triton(smoke, mode):
    """kernels=triton: adapter forward (ternary step + qmm with markers) and the merged model
    (qmm of the moved codes, z - mu) give the same logits, bit for bit, on the certificate's probe."""
    from lotaqaf_cli.core.quantize_model import quantize_model
    from lotaqaf_cli.stages.merge import merge

    quantize_model(smoke, [torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(0))],
                   bits=3, group_size=32, method="rtn")
    attach_ternary_adapters(smoke, 8, 2.0, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for m in smoke.modules():
            if isinstance(m, TernaryLinear):
                m.B_T.copy_(torch.randint(-1, 2, m.B_T.shape, generator=g).float())
    mode("triton")
    _layers, cert = merge(smoke, "lota")
    assert cert["exact"] and cert["max_abs_logit_diff"] == 0.0
    assert cert["codes"]["plus"] + cert["codes"]["minus"] > 0  # markers did fire


def test_cpu_int4_decode_path(mode):
    """auto on CPU: few rows of a 2/3/4-bit layer go through aten's int4 matmul (bf16 activations: close
    to float64, not equal); many rows, 8 bits or act-order stay on the torch path; an adapter and its
    merged layer agree bit for bit on the int4 path too."""
    mode("auto")
    for bits in (2, 3, 4):
        q, _codes, w64 = _layer(128, 48, bits, 32, bias=True, seed=bits)
        x = torch.randn(1, 128, generator=torch.Generator().manual_seed(3))
        assert q.contiguous_gs == 32 and kernels.pick(x, bits, q.contiguous_gs) == "cpu_int4"
        ref = x.double() @ w64 + q.bias.double()
        assert ((q(x).double() - ref).norm() / ref.norm()).item() < 1e-2
    q8, _c, _w = _layer(128, 48, 8, 32)
    qa, _c, _w = _layer(128, 48, 4, 32, act_order=True)
    assert qa.contiguous_gs is None
    assert kernels.pick(x, 8, q8.contiguous_gs) == "torch" and kernels.pick(x, 4, qa.contiguous_gs) == "torch"
    assert kernels.pick(torch.randn(64, 128), 4, q.contiguous_gs) == "torch"

    from lotaqaf_cli.core.merge import merge_ternary

    layer = TernaryLinear(copy.deepcopy(q), 8, 2.0, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        layer.B_T.copy_(torch.randint(-1, 2, layer.B_T.shape, generator=torch.Generator().manual_seed(5)).float())
    merged = merge_ternary(layer).layer
    assert merged.codes.ne(q.codes).any()  # markers moved codes
    with torch.no_grad():
        assert torch.equal(layer(x), merged(x))


def test_triton_refused_without_gpu(monkeypatch, capsys):
    from lotaqaf_cli.cli import main

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: kernels=triton is allowed")
    assert main(["train", "recipe=smoke", "kernels=triton"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "kernels=triton needs a CUDA device" in err[0]
