"""GPTQ checkpoints: exact round trip, corruption detection."""

import json

import pytest
import torch

from lotaqaf_cli.core.qlinear import QuantLinear
from lotaqaf_cli.core.quantize_model import quantize_model
from lotaqaf_cli.errors import LotaqafError
from lotaqaf_cli.io.checkpoint import load_quantized, save_quantized

SETTINGS = {"bits": 3, "group_size": 32, "act_order": True}


@pytest.fixture
def saved(smoke, calib_ids, tmp_path):
    quantize_model(smoke, list(calib_ids.split(4)), bits=3, group_size=32, act_order=True)
    out = tmp_path / "ckpt"
    chash = save_quantized(smoke, None, out, SETTINGS, {"source": "smoke"})
    return smoke, out, chash


def test_roundtrip_is_exact(saved, calib_ids):
    model, out, chash = saved
    loaded, tok, info = load_quantized(out)
    assert info["content_hash"] == chash and info["settings"]["bits"] == 3 and tok is None
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            n = loaded.get_submodule(name)
            for b in ("codes", "scales", "zeros", "g_idx"):
                assert torch.equal(getattr(m, b), getattr(n, b)), (name, b)
    with torch.no_grad():
        assert torch.equal(model(calib_ids).logits, loaded(calib_ids).logits)
    qcfg = json.loads((out / "quantize_config.json").read_text())
    for k, v in {"bits": 3, "group_size": 32, "desc_act": True, "sym": False, "quant_method": "gptq",
                 "checkpoint_format": "gptq", "pack_dtype": "int32"}.items():
        assert qcfg[k] == v
    assert info["settings"] == {"bits": 3, "group_size": 32, "act_order": True, "static_groups": False,
                                "true_sequential": False, "damp_percent": 0.01}  # lotaqaf's names again
    assert not list(out.parent.glob(".ckpt.tmp-*"))  # written through a temporary name


def test_gptq_tensor_layout(saved):
    from safetensors.torch import load_file

    _, out, _ = saved
    t = load_file(str(out / "model.safetensors"))
    q = t["model.layers.0.self_attn.q_proj.qweight"]
    assert q.dtype == torch.int32 and q.shape == (64 * 3 // 32, 64)
    assert t["model.layers.0.self_attn.q_proj.qzeros"].shape == (2, 64 * 3 // 32)
    assert t["model.layers.0.self_attn.q_proj.scales"].dtype == torch.float16
    assert t["model.layers.0.mlp.down_proj.g_idx"].shape == (128,)


def test_corrupted_file_is_detected(saved):
    _, out, _ = saved
    f = out / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(LotaqafError, match="corrupted"):
        load_quantized(out)


def test_truncated_file_without_manifest_is_detected(saved):
    _, out, _ = saved
    (out / "lotaqaf_manifest.json").unlink()  # as a checkpoint from another tool would be
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    with pytest.raises(LotaqafError, match="corrupted or truncated"):
        load_quantized(out)
