"""precision=auto|bf16|fp32: how it resolves, what it casts, and that bf16 keeps the method's contracts:
the ternary and LoRA layers against float64 references (bf16 tolerance), the merge bit-exact in bf16,
and a chained smoke run at bf16 with an exact certificate."""

import json

import pytest
import torch
from layers import random_qlinear
from reference import effective_weight

from lotaqaf_cli import precision
from lotaqaf_cli.core.lora import LoRALinear
from lotaqaf_cli.core.merge import merge_ternary
from lotaqaf_cli.core.ternary import TernaryLinear
from lotaqaf_cli.io.models import smoke_model

X86_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 amx_tile\n"
X86_PLAIN = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_native_bf16_read_from_cpuinfo():
    assert precision.native_bf16_cpu(X86_BF16) == "avx512_bf16"
    assert precision.native_bf16_cpu(X86_PLAIN) is None
    assert precision.native_bf16_cpu(ARM_BF16) == "bf16"
    assert precision.native_bf16_cpu("") is None


def test_resolve(monkeypatch):
    cpu = torch.device("cpu")
    assert precision.resolve("fp32", cpu).dtype == torch.float32
    assert precision.resolve("bf16", cpu).dtype == torch.bfloat16
    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: "avx512_bf16")
    p = precision.resolve("auto", cpu)
    assert (p.name, p.dtype) == ("bf16", torch.bfloat16) and "avx512_bf16" in p.why
    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: None)
    p = precision.resolve("auto", cpu)
    assert (p.name, p.dtype) == ("fp32", torch.float32) and "no native bf16" in p.why


def test_cast_touches_only_the_non_quantized_parameters():
    from lotaqaf_cli.core.quantize_model import quantize_model
    from lotaqaf_cli.core.ternary import attach_ternary_adapters

    model = smoke_model()
    quantize_model(model, [torch.randint(3, 256, (2, 16))], bits=4, group_size=32, method="rtn")
    attach_ternary_adapters(model, rank=4, omega=2)
    precision.cast_(model, torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert model.model.norm.weight.dtype == torch.bfloat16
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.A_T.dtype == layer.B_T.dtype == torch.float32           # adapter master weights
    assert layer.base.scales.dtype == layer.base.zeros.dtype == torch.float32
    assert layer.base.qweight.dtype == torch.int32
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert not precision.needs_cast(model, torch.bfloat16)
    assert precision.cast_copy(model, torch.bfloat16) is model
    assert precision.dtype_name(model) == "bfloat16"


def test_cast_copy_leaves_the_source_and_casts_what_cast_would():
    """The 16-bit row's copy: the parameters cast_ casts, copied straight into bf16 (tied ones still tied),
    everything else equal; the float32 source untouched."""
    model = smoke_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    copy_ = precision.cast_copy(model, torch.bfloat16)
    assert copy_ is not model and copy_.lm_head.weight is copy_.model.embed_tokens.weight
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[n])
    ref = precision.cast_(smoke_model(), torch.bfloat16)  # the same model cast in place
    got, want = dict(copy_.named_parameters()), dict(ref.named_parameters())
    assert got.keys() == want.keys()
    for n in want:
        assert got[n].dtype == want[n].dtype and torch.equal(got[n], want[n]), n
    assert copy_.model.rotary_emb.inv_freq.dtype == torch.float32
    ids = torch.randint(3, 256, (1, 8))
    assert torch.equal(copy_(ids).logits, ref(ids).logits)


def _ternary(seed=0, rows=96, rank=8, act_order=False):
    base = random_qlinear(128, 48, 3, 32, seed=seed, zeros="integer", fp16_scales=True, act_order=act_order)
    g = torch.Generator().manual_seed(seed + 1)
    t = TernaryLinear(base, rank=rank, omega=0.375 * rank, generator=g)
    with torch.no_grad():  # a trained-looking B_T: some |dW| cross omega, so markers fire
        t.B_T.copy_(torch.randint(-1, 2, t.B_T.shape, generator=g).float())
    x = torch.randn(rows, 128, generator=g)
    return t, x


@pytest.mark.parametrize("rows", [96, 2])  # 2 rows: the CPU int4 kernel's decode path where it applies
def test_ternary_bf16_against_float64(rows):
    t, x = _ternary(rows=rows)
    w64 = effective_weight(t.base, t.A_T, t.B_T, t.omega)
    y64 = x.double() @ w64
    y = t(x.bfloat16())
    assert y.dtype == torch.bfloat16
    err = (y.double() - y64).abs().max() / y64.abs().max()
    assert err < 2e-2, err  # bf16: 8 significant bits on x, W and y
    assert err > 0  # it did compute in bf16 (float32 would be ~1e-7)


@pytest.mark.parametrize("rank,act_order,dense", [(8, False, False), (24, False, True), (24, True, True)])
def test_ternary_bf16_gradients_against_float64(rank, act_order, dense):
    """Every backward path at bf16: per group (rank below half the group size), dense with one 16-bit pass
    over G (contiguous groups), dense through float32 (act-order groups)."""
    from reference import ste_grad_dW

    t, x = _ternary(rank=rank, act_order=act_order)
    assert t._per_group_grads_pay(x.shape[0]) is not dense
    xb = x.bfloat16().requires_grad_(True)
    dy = torch.randn(x.shape[0], 48, generator=torch.Generator().manual_seed(5))
    (t(xb).float() * dy).sum().backward()
    gd = ste_grad_dW(x.double().t() @ dy.double(), t.base, t.omega)
    ref_a, ref_b = gd @ t.B_T.double().t(), t.A_T.double().t() @ gd
    for got, ref in ((t.A_T.grad, ref_a), (t.B_T.grad, ref_b)):
        assert got.dtype == torch.float32
        assert (got.double() - ref).abs().max() / ref.abs().max() < 2e-2
    ref_x = dy.double() @ effective_weight(t.base, t.A_T, t.B_T, t.omega).t()
    assert xb.grad.dtype == torch.bfloat16
    assert (xb.grad.double() - ref_x).abs().max() / ref_x.abs().max() < 2e-2


@pytest.mark.parametrize("rows", [96, 2])
def test_merge_is_bit_exact_in_bf16(rows):
    t, x = _ternary(rows=rows)
    merged = merge_ternary(t).layer
    xb = x.bfloat16()
    with torch.no_grad():
        assert torch.equal(t(xb), merged(xb))


def test_lora_bf16_against_float64():
    base = random_qlinear(128, 48, 4, 32, seed=3, fp16_scales=True)
    lora = LoRALinear(base, rank=8, alpha=16)
    with torch.no_grad():
        lora.lora_B.normal_(generator=torch.Generator().manual_seed(4))
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(6))
    from layers import dense64
    w64 = dense64(base) + lora.lora_A.double() @ lora.lora_B.double() * lora.scaling
    y = lora(x.bfloat16())
    assert y.dtype == torch.bfloat16
    y64 = x.double() @ w64
    assert (y.double() - y64).abs().max() / y64.abs().max() < 2e-2
    y.float().sum().backward()
    assert lora.lora_A.grad.dtype == lora.lora_B.grad.dtype == torch.float32
    ref_b = (x.double() @ lora.lora_A.double()).t() @ torch.ones(64, 48, dtype=torch.float64) * lora.scaling
    assert (lora.lora_B.grad.double() - ref_b).abs().max() / ref_b.abs().max() < 2e-2


def test_smoke_chain_at_bf16(in_tmp):
    from cli_helpers import run_commands_in

    run_commands_in(in_tmp, [["train", "recipe=smoke", "run.dir=runs/smoke/bf16", "precision=bf16",
                              "adapter.omega=2", "optim.steps=4", "stages=[quantize,train,ppl,merge]"]])
    run = in_tmp / "runs/smoke/bf16"
    cert = json.loads((run / "merge_certificate.json").read_text())
    assert cert["probe"]["dtype"] == "bfloat16"
    assert cert["max_abs_logit_diff"] == 0.0 and cert["max_abs_layer_diff_from_disk"] == 0.0
    assert json.loads((run / "train.json").read_text())["precision"] == "bf16"
    assert "precision bf16: precision=bf16" in (run / "run.log").read_text()
