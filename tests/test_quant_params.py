"""Scale and zero-point tuning (core/quant_params.py) against a float64 reference, its exact merge, and the
merged `scales` checkpoint as plain GPTQ: gptqmodel's own fixture, scales trained, written and re-read."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lotaqaf_cli.core.qlinear import QuantLinear, quantized_modules, replace_module
from lotaqaf_cli.core.quant import max_code, num_groups, unpack_zeros_v1
from lotaqaf_cli.core.quant_params import QuantParamLinear, attach_quant_params, check_train
from lotaqaf_cli.io.checkpoint import load_quantized, save_quantized

FIXTURE = Path(__file__).parent / "fixtures" / "gptqmodel_w4_g32"


def _base(bits=3, d_in=96, d_out=64, gs=32, seed=0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, max_code(bits) + 1, (d_in, d_out), generator=g, dtype=torch.uint8)
    G = num_groups(d_in, gs)
    scales = (torch.rand(G, d_out, generator=g) * 0.05 + 0.01).half().float()   # as a GPTQ checkpoint holds them
    zeros = torch.randint(0, max_code(bits) + 1, (G, d_out), generator=g).float()
    bias = torch.randn(d_out, generator=g)
    return QuantLinear.from_quantized(codes, scales, zeros, torch.arange(d_in) // gs, bits, gs, bias)


def _reference(q: QuantLinear, x, s_master, delta):
    """y = x @ W + b in float64, W = fp16(s)[g] * (W_int - (z - delta / s0)[g]), written from the formula."""
    g = q.g_idx.long()
    s = s_master.detach().half().double() + (s_master - s_master.detach())  # fp16 value, gradient straight through
    z = q.zeros.double() - (delta / q.scales.double() if delta is not None else 0.0)
    w = s[g] * (q.codes.double() - z[g])
    return x @ w + q.bias.double()


@pytest.mark.parametrize("train", [("scales",), ("zeros",), ("scales", "zeros")])
def test_forward_and_gradients_match_float64_reference(train):
    torch.manual_seed(1)
    q = _base()
    layer = QuantParamLinear(q, train)
    with torch.no_grad():   # trained-looking values: scales moved by a few percent, zero points shifted
        if "scales" in train:
            layer.scales.mul_(1 + 0.05 * torch.randn_like(layer.scales))
        if "zeros" in train:
            layer.zero_delta.copy_(0.3 * q.scales * torch.randn_like(q.scales))
    x = torch.randn(5, 7, q.in_features, requires_grad=True)
    r = torch.randn(5, 7, q.out_features)
    (layer(x) * r).sum().backward()

    s64 = (layer.scales if "scales" in train else q.scales).detach().double().requires_grad_()
    d64 = layer.zero_delta.detach().double().requires_grad_() if "zeros" in train else None
    x64 = x.detach().double().requires_grad_()
    y64 = _reference(q, x64, s64, d64)
    (y64 * r.double()).sum().backward()

    torch.testing.assert_close(layer(x).double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    if "scales" in train:
        torch.testing.assert_close(layer.scales.grad.double(), s64.grad, rtol=1e-4, atol=1e-4)
    if "zeros" in train:
        torch.testing.assert_close(layer.zero_delta.grad.double(), d64.grad, rtol=1e-4, atol=1e-4)


def test_starts_as_the_base_and_merges_bit_exactly():
    q = _base(bits=4, d_in=128, gs=64)
    layer = QuantParamLinear(q, ("scales", "zeros"))
    x = torch.randn(3, 11, q.in_features)
    assert torch.equal(layer(x), q(x))  # untrained: the base exactly (its scales are float16 values)
    with torch.no_grad():
        layer.scales.mul_(1.013)
        layer.zero_delta.fill_(0.002)
    merged = layer.merged()
    assert torch.equal(merged.qweight, q.qweight) and torch.equal(merged.scales, merged.scales.half().float())
    for xb in (x, x.bfloat16(), torch.randn(1, 1, q.in_features)):  # the torch path and aten's int4 path
        assert torch.equal(merged(xb), layer(xb))


def test_train_lists_are_checked():
    assert check_train(["zeros", "scales"]) == ("scales", "zeros")
    for bad in ([], ["scale"], ["zeros", "zeros"]):
        with pytest.raises(ValueError, match="adapter.train"):
            check_train(bad)


def test_merged_scales_checkpoint_is_plain_gptq(tmp_path):
    """gptqmodel's checkpoint, its scales moved as training would, merged and written: gptqmodel's layout with
    only the scales changed (codes, qzeros and g_idx as gptqmodel wrote them, checkpoint_format gptq, no
    fractional zero points), and the weights a plain GPTQ reader forms from it are the trained layer's."""
    model, tok, info = load_quantized(FIXTURE)
    names = attach_quant_params(model, ("scales",), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"])
    assert len(names) == 14
    torch.manual_seed(0)
    x = torch.randint(3, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        for n in names:
            model.get_submodule(n).scales.mul_(1 + 0.1 * torch.rand_like(model.get_submodule(n).scales))
        adapter_logits = model(x).logits
        for n in names:
            replace_module(model, n, model.get_submodule(n).merged())
    save_quantized(model, tok, tmp_path / "merged", info["settings"], {"source": FIXTURE.name})

    cfg = json.loads((tmp_path / "merged" / "quantize_config.json").read_text())
    assert cfg["checkpoint_format"] == "gptq" and cfg["quant_method"] == "gptq"
    with safe_open(str(FIXTURE / "model.safetensors"), "pt") as f:
        theirs = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        ours = {k: f.get_tensor(k) for k in f.keys()}
    assert not [k for k in ours if k.endswith((".zero_points", ".markers"))]
    for k in theirs:
        if k.endswith((".qweight", ".qzeros", ".g_idx")):
            assert torch.equal(ours[k], theirs[k]), k
        elif k.endswith(".scales"):
            assert ours[k].dtype == torch.float16 and not torch.equal(ours[k], theirs[k]), k

    reread, _, _ = load_quantized(tmp_path / "merged")
    bits = cfg["bits"]
    for name, m in quantized_modules(reread).items():  # GPTQ's formula by hand: s * (code - (stored zero + 1))
        z = unpack_zeros_v1(ours[f"{name}.qzeros"], bits, m.out_features).double()
        g = ours[f"{name}.g_idx"].long()
        w = ours[f"{name}.scales"].double()[g] * (m.codes.double() - z[g])
        assert torch.equal(m.dequantize().double(), w), name
    with torch.no_grad():
        assert torch.equal(reread(x).logits, adapter_logits)


@pytest.mark.parametrize("adapter, train, fmt", [("scales", "[scales]", "gptq"),
                                                 ("zeros", "[scales,zeros]", "lotaqaf_float_zero")])
def test_cli_trains_and_merges_with_certificate_zero(adapter, train, fmt, smoke_lota_root, tmp_path):
    """`lotaqaf train adapter=scales|zeros` on the smoke base: the merge certificate is exactly 0, and the
    merged checkpoint is plain GPTQ for scales, float zero points once the zero points train."""
    from cli_helpers import copy_smoke_run, run_commands_in

    root = copy_smoke_run(smoke_lota_root, tmp_path)
    run_commands_in(root, [["train", "recipe=smoke", "run.dir=runs/smoke/q", f"adapter={adapter}",
                            f"adapter.train={train}", "optim.lr=0.01", "optim.steps=4", "stages=[quantize,train,merge]"]])
    run = root / "runs/smoke/q"
    cert = json.loads((run / "merge_certificate.json").read_text())
    assert cert["kind"] == adapter and cert["exact"]
    assert cert["max_abs_layer_diff"] == cert["max_abs_layer_diff_from_disk"] == cert["max_abs_logit_diff"] == 0.0
    assert cert["perplexity"]["change"] == 0.0
    assert json.loads((run / "merged" / "quantize_config.json").read_text())["checkpoint_format"] == fmt
    with safe_open(str(run / "adapter.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.endswith(".scales") for k in keys) and any(k.endswith(".zero_delta") for k in keys) == (adapter == "zeros")


def test_merge_from_disk_at_bf16_keeps_the_trained_parameters(smoke_lota_root, tmp_path):
    """`lotaqaf merge` in a fresh process at precision=bf16 casts the base's float tensors, never the adapter's:
    the merged checkpoint's scales are the adapter file's float32 scales rounded to fp16 (not first to bf16),
    and its zero points z - delta / s0 of the file's delta."""
    from cli_helpers import copy_smoke_run, run_commands_in
    from safetensors.torch import load_file

    from lotaqaf_cli.io.checkpoint import weight_files

    root = copy_smoke_run(smoke_lota_root, tmp_path)
    run_commands_in(root, [["train", "recipe=smoke", "run.dir=runs/smoke/z", "adapter=zeros", "adapter.train=[scales,zeros]",
                            "optim.lr=0.01", "optim.steps=4", "precision=bf16", "stages=[quantize,train]"],
                           ["merge", "run=runs/smoke/z", "precision=bf16"]])
    run = root / "runs/smoke/z"
    adapter = load_file(str(run / "adapter.safetensors"))
    merged = {k: v for f in weight_files(run / "merged") for k, v in load_file(str(f)).items()}
    base, _, _ = load_quantized(json.loads((run / "quantize.json").read_text())["checkpoint"])
    names = [k[: -len(".scales")] for k in adapter if k.endswith(".scales")]
    assert names
    for n in names:
        s = adapter[f"{n}.scales"]
        assert s.dtype == torch.float32 and not torch.equal(s, s.bfloat16().float())  # trained to finer than bf16
        assert torch.equal(merged[f"{n}.scales"], s.half()), n
        z = base.get_submodule(n).zeros.float() - adapter[f"{n}.zero_delta"] / base.get_submodule(n).scales.float()
        assert torch.equal(merged[f"{n}.zero_points"], z), n
