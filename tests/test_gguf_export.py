"""GGUF export of SmolLM2 with fractional zero points: read back with the gguf package's own reader
and dequantizer, and loaded with transformers' GGUF loader."""

import copy

import numpy as np
import pytest
import torch

from lotaqaf_cli.core.qlinear import QuantLinear
from lotaqaf_cli.core.quantize_model import quantize_model
from lotaqaf_cli.data.selfgen import prompts_for
from lotaqaf_cli.io.gguf_export import export_gguf, gguf_name, rotary_row_order, stored_model
from lotaqaf_cli.io.models import gguf_file

pytestmark = pytest.mark.slow


def test_rotary_row_order_matches_llama_cpp_permute():
    w = torch.arange(12 * 2).reshape(12, 2)
    n_head = 2  # llama.cpp: w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)
    ref = w.reshape(n_head, 2, 12 // n_head // 2, 2).swapaxes(1, 2).reshape(12, 2)
    assert torch.equal(w[rotary_row_order(12, n_head)], ref)


def test_gguf_roundtrip(smollm2_loaded, tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM

    model = copy.deepcopy(smollm2_loaded.model)
    g = torch.Generator().manual_seed(0)
    quantize_model(model, [torch.randint(100, 40000, (2, 32), generator=g)], bits=4, group_size=64, method="rtn")
    for m in model.modules():  # fractional zero points, as a merged LoTA-QAF model has
        if isinstance(m, QuantLinear):
            m.zeros = m.zeros - (torch.rand(m.zeros.shape, generator=g) - 0.5) * 0.2
    out = tmp_path / "model.gguf"
    rep = export_gguf(model, "embedded:smollm2", out, smollm2_loaded.tokenizer)
    assert rep["layers_by_type"] == {"q4_1": 210} and rep["max_weight_error_in_steps"] <= 15 * 2**-11

    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    cfg = model.config
    worst = 0.0
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        t = tensors[gguf_name(name + ".weight")]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1
        theirs = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).float()
        ours = m.dequantize().t()
        if "q_proj" in name or "k_proj" in name:
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            ours = ours[rotary_row_order(m.out_features, heads)]
        worst = max(worst, (theirs - ours).abs().max().item())
    assert worst <= rep["max_weight_error"] * (1 + 1e-3) + 1e-6  # float32 arithmetic of the reader

    src = gguf.GGUFReader(str(gguf_file("embedded:smollm2")))
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_1
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.pre", "tokenizer.ggml.merges", "llama.rope.freq_base"):
        assert reader.fields[key].contents() == src.fields[key].contents(), key  # copied from the source
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="model.gguf", dtype=torch.float32)
    text = " ".join(prompts_for("heldout", 0))
    ids = torch.tensor(smollm2_loaded.tokenizer(text)["input_ids"][:64]).view(1, 64)
    with torch.no_grad():
        ours = stored_model(model)(ids).logits   # the values the file holds, in float32
        assert (loaded(ids).logits - ours).abs().max().item() < 1e-3
