"""NF4 (QLoRA's base, bitsandbytes Linear4bit) against float64 references written in the test.

The NF4 code book is typed from the QLoRA paper (Dettmers et al. 2023, appendix E); codes and statistics
are read from the layer's quant_state and dequantized here by hand.
"""

import importlib.util
import sys

import pytest
import torch
from torch import nn

from lotaqaf_cli.core.nf4 import (
    NF4_BLOCKSIZE,
    dequantize_nf4,
    is_nf4,
    nf4_bits_per_weight,
    nf4_layers,
    quantize_linear_nf4,
    quantize_model_nf4,
    requantize_nf4,
)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")

NF4_PAPER = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=torch.float64)
OUT, IN = 96, 128


def make_linear(out_f=OUT, in_f=IN, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(out_f, generator=g) * 0.1)
    return lin


def unpack_codes(layer) -> torch.Tensor:
    """The 4-bit codes in flattened row-major [out, in] order, as int64.

    Two codes per byte, the HIGH nibble first: element 2k is byte[k] >> 4, element 2k+1 is byte[k] & 0xF
    (bitsandbytes/backends/default/ops.py packs ``(q[::2] << 4) | q[1::2]``; confirmed on the CPU
    library by this test's comparison with dequantize_nf4, which the low-nibble-first order fails).
    """
    packed = layer.weight.data.reshape(-1).to(torch.int64)
    return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)


def weight_ref(codes: torch.Tensor, absmax: torch.Tensor, shape=(OUT, IN)) -> torch.Tensor:
    """float64 W: code book value x absmax of its 64-element block (blocks over the flattened weight)."""
    return (NF4_PAPER[codes] * absmax.double().repeat_interleave(NF4_BLOCKSIZE)).reshape(shape)


def absmax_ref(qs) -> torch.Tensor:
    """Double quant, float64: absmax[b] = code2[a[b]] * absmax2[b // 256] + offset."""
    a = qs.absmax.to(torch.int64)
    state2 = qs.state2
    assert qs.absmax.dtype == torch.uint8 and state2.blocksize == 256
    scale = state2.absmax.double().repeat_interleave(256)[: a.numel()]
    return state2.code.double()[a] * scale + qs.offset.double()


def check_forward(layer, w_ref, bias, out_scale_tol=1e-5):
    x = torch.randn(4, 7, IN, generator=torch.Generator().manual_seed(1))
    ref = x.double() @ w_ref.T + bias.double()
    y = layer(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=out_scale_tol * ref.abs().max().item())


def test_a_nf4_codes_absmax_and_forward_match_hand_dequantization():
    lin = make_linear()
    layer = quantize_linear_nf4(lin, torch.float32, double_quant=False)
    assert is_nf4(layer) and not layer.weight.requires_grad and not layer.bias.requires_grad
    qs = layer.weight.quant_state
    assert not qs.nested and qs.blocksize == 64 and qs.absmax.dtype == torch.float32
    codes = unpack_codes(layer)
    assert codes.numel() == OUT * IN
    w_ref = weight_ref(codes, qs.absmax)
    # (a) the hand dequantization is bitsandbytes' to float32 rounding
    torch.testing.assert_close(dequantize_nf4(layer).double(), w_ref, rtol=1.2e-7, atol=0)
    # absmax is max |w| of each block of the original weight (row-major flattened)
    w64 = lin.weight.detach().double().reshape(-1, NF4_BLOCKSIZE)
    torch.testing.assert_close(qs.absmax.double(), w64.abs().amax(1), rtol=1e-7, atol=0)
    # (b) each code is the code-book value nearest to w / absmax (ties: within 1e-6 of equidistant)
    r = (w64 / w64.abs().amax(1, keepdim=True)).reshape(-1)
    dist = (r[:, None] - NF4_PAPER[None, :]).abs()
    best = dist.argmin(1)
    chosen = dist.gather(1, codes[:, None]).squeeze(1)
    mismatch = codes != best
    assert (chosen[mismatch] - dist.min(1).values[mismatch] < 1e-6).all()
    assert mismatch.float().mean() < 0.01
    # (c) the forward on float32 input is x @ W_ref^T + b; in eval mode too (no bf16 CPU repacking)
    check_forward(layer, w_ref, lin.bias)
    layer.eval()
    with torch.no_grad():
        check_forward(layer, w_ref, lin.bias)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)


def test_b_double_quant_absmax_dequantized_by_hand():
    lin = make_linear(seed=2)
    layer = quantize_linear_nf4(lin, torch.float32)  # double_quant=True: QLoRA's default
    qs = layer.weight.quant_state
    assert qs.nested and qs.blocksize == 64 and qs.state2.blocksize == 256
    absmax = absmax_ref(qs)
    # the 8-bit absmax stays close to the true block absmax of the original weight (dynamic map error)
    true_absmax = lin.weight.detach().double().reshape(-1, NF4_BLOCKSIZE).abs().amax(1)
    torch.testing.assert_close(absmax, true_absmax, rtol=0.02, atol=0)
    w_ref = weight_ref(unpack_codes(layer), absmax)
    torch.testing.assert_close(dequantize_nf4(layer).double(), w_ref, rtol=1e-6, atol=1e-7 * w_ref.abs().max().item())
    check_forward(layer, w_ref, lin.bias)


def test_c_bf16_forward_and_backward_against_float64():
    lin = make_linear(seed=3)
    for compute_dtype in (torch.bfloat16, torch.float32):
        layer = quantize_linear_nf4(lin, compute_dtype)
        w_ref = weight_ref(unpack_codes(layer), absmax_ref(layer.weight.quant_state))
        g = torch.Generator().manual_seed(4)
        x64 = torch.randn(3, 5, IN, generator=g, dtype=torch.float64)
        grad_out = torch.randn(3, 5, OUT, generator=g, dtype=torch.float64)
        ref = x64 @ w_ref.T + lin.bias.detach().double()
        for in_dtype in (torch.bfloat16, torch.float32):
            x = x64.to(in_dtype).requires_grad_(True)
            y = layer(x)
            assert y.dtype == in_dtype
            loose = in_dtype == torch.bfloat16 or compute_dtype == torch.bfloat16
            tol = 2e-2 if loose else 1e-5
            torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
            y.backward(grad_out.to(in_dtype))
            gref = grad_out @ w_ref
            assert x.grad.dtype == in_dtype
            torch.testing.assert_close(x.grad.double(), gref, rtol=tol, atol=tol * gref.abs().max().item())
        assert layer.weight.grad is None


def test_d_bits_per_weight_match_the_stored_tensors():
    assert nf4_bits_per_weight(64, double_quant=False) == 4.5
    assert nf4_bits_per_weight() == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))
    assert nf4_bits_per_weight() == pytest.approx(4.127, abs=1e-3)
    assert nf4_bits_per_weight(128, double_quant=False) == 4.25
    out_f, in_f = 64, 1024  # 65536 weights = 1024 blocks = 4 nested blocks of 256
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(5))
    for double_quant in (False, True):
        layer = requantize_nf4(w, None, torch.float32, double_quant=double_quant)
        qs = layer.weight.quant_state
        tensors = [layer.weight.data, qs.absmax] + ([qs.state2.absmax] if double_quant else [])
        bits = 8 * sum(t.numel() * t.element_size() for t in tensors)
        assert bits / (out_f * in_f) == pytest.approx(nf4_bits_per_weight(double_quant=double_quant), rel=1e-12)
        # left out of the figure: per-tensor constants (offset, 256-entry 8-bit map, 16 NF4 values)
        if double_quant:
            assert qs.offset.numel() == 1 and qs.state2.code.numel() == 256


def test_e_quantize_model_replaces_only_targets():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.o_proj = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)
            self.mlp = nn.ModuleDict({"up_proj": nn.Linear(64, 128, bias=False), "norm": nn.LayerNorm(128)})

    model = nn.Sequential(Block(), Block())
    model.add_module("lm_head", nn.Linear(64, 32))
    keep = {n: m for n, m in model.named_modules() if n.endswith(("k_proj", "o_proj", "lm_head", "norm"))}
    up = model[1].mlp["up_proj"]
    names = quantize_model_nf4(model, ["q_proj", "up_proj", "norm"], torch.float32)
    assert names == ["0.q_proj", "0.mlp.up_proj", "1.q_proj", "1.mlp.up_proj"]
    assert sorted(nf4_layers(model)) == sorted(names)
    assert all(model.get_submodule(n) is m for n, m in keep.items())
    assert not is_nf4(model.lm_head) and not is_nf4(model[0].mlp["norm"])
    layer = model[1].mlp["up_proj"]
    assert layer.bias is None and (layer.out_features, layer.in_features) == (128, 64)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(6))
    ref = x.double() @ weight_ref(unpack_codes(layer), absmax_ref(layer.weight.quant_state), (128, 64)).T
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)
    # off by at most half NF4's widest gap (-1 to -0.696) times a block's absmax (+ the 8-bit absmax's error)
    assert (dequantize_nf4(layer) - up.weight.detach()).abs().max() < 0.16 * up.weight.abs().max()
    assert quantize_model_nf4(model, ["q_proj", "up_proj"], torch.float32) == []  # already NF4


def test_missing_bitsandbytes_is_a_user_error(monkeypatch, capsys, in_tmp):
    """Without bitsandbytes: the layer says why (ImportError), and `lotaqaf train quant=nf4` refuses before any
    work in one line, exit 2."""
    from cli_helpers import one_line_error

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        requantize_nf4(torch.zeros(4, 64), None, torch.float32)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else
                        find_spec(name, *a))
    one_line_error(capsys, ["train", "recipe=smoke", "quant=nf4", "adapter=lora"],
                   "quant=nf4 needs bitsandbytes (pip install bitsandbytes)")


def test_qlora_chain_on_the_smoke_model(tmp_path):
    """`lotaqaf train quant=nf4 adapter=lora`: the NF4 base is built from the source, the LoRA trains on it, the
    merge back into NF4 is measured and not written; `lotaqaf merge` on the run from disk rebuilds the same NF4
    base (the adapter's base hash binds it) and measures the same loss; `lotaqaf export --format hf16
    export.source=adapter` runs in transformers quantizing to NF4 at load + PEFT, with lotaqaf's continuations."""
    import json

    from cli_helpers import run_commands_in

    run_commands_in(tmp_path, [["train", "recipe=smoke", "quant=nf4", "quant.group_size=64", "adapter=lora",
                                "optim.lr=0.01", "optim.steps=3", "run.dir=runs/q", "stages=[quantize,train,ppl,merge]"]])
    run = tmp_path / "runs/q"
    cert = json.loads((run / "merge_certificate.json").read_text())
    assert cert["written"] is False and not (run / "merged").exists() and cert["max_abs_logit_diff"] > 0
    quant = json.loads((run / "quantize.json").read_text())
    assert quant["nf4"] and quant["settings"] == {"method": "nf4", "bits": 4, "group_size": 64, "double_quant": True}
    (run / "merge_certificate.json").unlink()
    run_commands_in(tmp_path, [["merge", "run=runs/q"]])
    again = json.loads((run / "merge_certificate.json").read_text())
    assert again["max_abs_logit_diff"] == cert["max_abs_logit_diff"] and again["base_hash"] == cert["base_hash"]
    run_commands_in(tmp_path, [["export", "run=runs/q", "--format", "hf16", "export.source=adapter"]])
    engine = json.loads((run / "export-hf16-adapter.json").read_text())["engines"]["transformers_bnb_peft"]
    assert engine["checked"] and engine["same_continuations"] == engine["prompts"] == 8, engine
