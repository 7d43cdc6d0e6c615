"""Lossless merge: the merged model's logits equal the adapter model's bit for bit; unmerge restores
the base exactly; the LoRA baseline's merge (re-quantization) is not lossless."""

import copy

import pytest
import torch

from lotaqaf_cli.core.lora import attach_lora
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
