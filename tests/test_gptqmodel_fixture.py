"""Compatibility with gptqmodel, the maintained GPTQ library, through files it wrote.

The fixtures under tests/fixtures/gptqmodel_* were produced by scripts/make_gptq_fixture.py with
gptqmodel 7.6.0 in a side venv, together with gptqmodel's own dequantized weights. They include
zero points of 0 and 2^bits - 1 (the v1 borrow case) and an act-order (desc_act) checkpoint.
"""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lotaqaf_cli.core.qlinear import QuantLinear
from lotaqaf_cli.io.checkpoint import load_quantized, save_quantized

FIXTURES = sorted(p for p in (Path(__file__).parent / "fixtures").glob("gptqmodel_*") if p.is_dir())


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.name)
def test_lotaqaf_reads_gptqmodel_checkpoint(fixture):
    model, tok, info = load_quantized(fixture)
    ref = load_file(str(fixture / "reference_dequant.safetensors"))
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(names) == 14
    for name in names:
        ours = model.get_submodule(name).dequantize().t()  # nn.Linear orientation [out, in]
        theirs = ref[f"{name}.weight"]
        assert torch.equal(ours.to(theirs.dtype), theirs), name


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.name)
def test_lotaqaf_writes_what_gptqmodel_wrote(fixture, tmp_path):
    """Re-saving gptqmodel's checkpoint with lotaqaf's writer gives the same quantized tensors bit for bit."""
    model, tok, info = load_quantized(fixture)
    save_quantized(model, tok, tmp_path / "ours", info["settings"], {"source": fixture.name})
    with safe_open(str(fixture / "model.safetensors"), "pt") as f:
        theirs = {k: f.get_tensor(k) for k in f.keys()}
    ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
    quant_keys = [k for k in theirs if k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))]
    assert len(quant_keys) == 14 * 4
    for k in quant_keys:
        assert torch.equal(ours[k], theirs[k]), k
