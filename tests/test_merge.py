"""Lossless merge: the merged model's logits equal the adapter model's bit for bit; unmerge restores
the base exactly; the LoRA baseline's merge (re-quantization) is not lossless."""

import copy

import pytest
import torch

from lotaqaf_cli.core.lora import LoRALinear, attach_lora
from lotaqaf_cli.core.merge import merge_lora_model, merge_model, unmerge_layer
from lotaqaf_cli.core.qlinear import QuantLinear
from lotaqaf_cli.core.quantize_model import quantize_model
from lotaqaf_cli.core.ternary import TernaryLinear, attach_ternary_adapters


def adapted_smoke(smoke, calib_ids, bits, act_order, granularity, seed=0):
    quantize_model(smoke, list(calib_ids.split(4)), bits=bits, group_size=32, act_order=act_order)
    base = copy.deepcopy(smoke)
    g = torch.Generator().manual_seed(seed)
    attach_ternary_adapters(smoke, rank=8, omega=2, offset_granularity=granularity, generator=g)
    with torch.no_grad():  # a "trained" adapter: random ternary B_T so that markers and mu are non-trivial
        for m in smoke.modules():
            if isinstance(m, TernaryLinear):
                m.B_T.copy_(torch.randint(-1, 2, m.B_T.shape, generator=g).float())
    return base, smoke


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("granularity", ["group", "channel", "tensor", "none"])
def test_merge_is_exact(smoke, calib_ids, bits, act_order, granularity):
    base, model = adapted_smoke(smoke, calib_ids, bits, act_order, granularity)
    probe = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = model(probe).logits
        merged = copy.deepcopy(model)
        info = merge_model(merged)
        out = merged(probe).logits
    assert not any(isinstance(m, TernaryLinear) for m in merged.modules())
    assert (out - ref).abs().max().item() == 0.0
    changed = sum(s.stats["plus"] + s.stats["minus"] for s in info.values())
    assert changed > 0  # the test exercises real code changes
    for name, ml in info.items():
        q = ml.layer
        assert int(q.codes.max()) <= 2**bits - 1  # never off the grid
        if granularity == "none":
            assert torch.equal(q.zeros, q.zeros.round())  # a plain GPTQ layer
        restored = unmerge_layer(q, ml.markers, ml.int_zeros)
        orig = base.get_submodule(name)
        for b in ("codes", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(restored, b), getattr(orig, b)), (name, b)


def test_boundary_blocked_codes_are_counted(smoke, calib_ids):
    _, model = adapted_smoke(smoke, calib_ids, 2, False, "group")
    info = merge_model(copy.deepcopy(model))
    assert sum(s.stats["blocked"] for s in info.values()) > 0  # at 2 bits many codes sit at 0 or 3


@pytest.mark.parametrize("kind", ["lora", "qalora"])
def test_lora_merge_by_requantization(smoke, calib_ids, kind):
    quantize_model(smoke, list(calib_ids.split(4)), bits=4, group_size=32)
    attach_lora(smoke, kind, 4, 8, 0.0, ["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():
        for n, p in smoke.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
        ref = smoke(calib_ids).logits
        merged = copy.deepcopy(smoke)
        names = merge_lora_model(merged)
        out = merged(calib_ids).logits
    assert len(names) == 6 and all(isinstance(merged.get_submodule(n), QuantLinear) for n in names)
    diff = (out - ref).abs().max().item()
    if kind == "lora":
        assert diff > 1e-4  # re-quantization loses the adapter partly
    else:
        assert diff < 1e-3  # QA-LoRA folds into zero points (float rounding only)


def test_base_scored_without_adapters_is_the_base(smoke, calib_ids):
    """One copy of the packed base: the adapters wrap its layers by reference, and without_adapters gives
    the base's logits bit for bit (the chain's GPTQ row), then the adapter model's again."""
    from lotaqaf_cli.io.adapter import adapter_layers, without_adapters

    base, model = adapted_smoke(smoke, calib_ids, 3, False, "group")
    with torch.no_grad():
        ref_base, ref_adapted = base(calib_ids).logits, model(calib_ids).logits
        assert not torch.equal(ref_base, ref_adapted)
        with without_adapters(model) as plain:
            assert not adapter_layers(plain)
            assert torch.equal(plain(calib_ids).logits, ref_base)
        assert torch.equal(model(calib_ids).logits, ref_adapted)


def _written(tmp_path, model, kind, tamper=None):
    """The streamed merge of stages/merge.py into a ShardedWriter under tmp_path, as the chain runs it;
    ``tamper(i, layers)`` may change what is read back."""
    from lotaqaf_cli.io.checkpoint import ShardedWriter
    from lotaqaf_cli.stages.merge import merge

    writer, order = ShardedWriter(tmp_path, 2), []

    def write_layer(i, layer, merged):
        order.append(i)
        writer.add_layer(i, layer, merged)

    def read_layer(i):
        layers = writer.read_layer(i, 3, 32)
        return layers if tamper is None else tamper(i, layers)

    layers, cert = merge(model, kind, write_layer=write_layer, read_layer=read_layer)
    return order, layers, cert


def test_streamed_merge_certifies_every_layer_and_the_disk(smoke, calib_ids, tmp_path):
    """The merge in place, layer by layer: every merged layer's output, and the written shard's, equals
    the adapter layer's on the probe's activations; the merged model's logits equal the adapter
    model's (computed before the merge, by the adapter layers); each layer is written once, in order."""
    from lotaqaf_cli.core.merge import probe_logits

    _, model = adapted_smoke(smoke, calib_ids, 3, False, "group")
    with torch.no_grad():
        ref = probe_logits(model)
    order, layers, cert = _written(tmp_path, model, "lota")
    assert order == [0, 1] and len(layers) == 14
    assert cert["exact"] and cert["max_abs_layer_diff"] == 0.0 and cert["max_abs_layer_diff_from_disk"] == 0.0
    assert not any(isinstance(m, TernaryLinear) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(probe_logits(model), ref)
    assert cert["codes"]["plus"] + cert["codes"]["minus"] > 0


def test_streamed_merge_refuses_a_bad_shard(smoke, calib_ids, tmp_path):
    """A written layer that does not compute what its adapter layer computed (one code moved) is refused
    at that layer."""
    from lotaqaf_cli.errors import LotaqafError

    def tamper(i, layers):
        q = layers["model.layers.1.mlp.down_proj"] if i == 1 else None
        if q is not None:
            codes = q.codes.clone()
            codes[0, 0] = (codes[0, 0] + 1) % 8
            layers["model.layers.1.mlp.down_proj"] = QuantLinear.from_quantized(
                codes, q.scales, q.zeros, q.g_idx, q.bits, q.group_size, q.bias)
        return layers

    _, model = adapted_smoke(smoke, calib_ids, 3, False, "group")
    with pytest.raises(LotaqafError, match="on the written checkpoint at decoder layer 1"):
        _written(tmp_path, model, "lota", tamper)


def test_streamed_lora_merge_reports_its_loss_and_keeps_the_adapters(smoke, calib_ids, tmp_path):
    quantize_model(smoke, list(calib_ids.split(4)), bits=3, group_size=32)
    attach_lora(smoke, "lora", 4, 8, 0.0, ["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():
        for n, p in smoke.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
    _, layers, cert = _written(tmp_path, smoke, "lora")
    assert layers == {} and not cert["exact"] and cert["max_abs_logit_diff"] > 0
    assert sum(isinstance(m, LoRALinear) for m in smoke.modules()) == 6  # the adapter model, for its eval
