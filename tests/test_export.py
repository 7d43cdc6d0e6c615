"""`lotaqaf export` on the smoke recipe: exact GPTQ export without the offset factor, refusal with it,
hf16, and the GGUF source requirement."""

import json

import pytest
import torch
from cli_helpers import one_line_error, run_commands_in

from lotaqaf_cli.cli import main
from lotaqaf_cli.core.qlinear import quantized_modules
from lotaqaf_cli.io.checkpoint import load_quantized


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cmds = []
    for name, gran in (("mu", "group"), ("nomu", "none")):
        cmds.append(["train", "recipe=smoke", f"run.dir=runs/{name}", "adapter.omega=2", "optim.steps=8",
                     f"adapter.offset_granularity={gran}", "stages=[quantize,train]"])
        cmds.append(["merge", f"run=runs/{name}"])
    return run_commands_in(tmp_path_factory.mktemp("export"), cmds)


@pytest.fixture
def here(runs, monkeypatch):
    monkeypatch.chdir(runs)
    return runs


def test_float_zero_checkpoints_do_not_declare_plain_gptq(here):
    """A merged checkpoint that needs its fractional zero points declares a format plain GPTQ loaders
    refuse (in both files they read); an integer-only one, and the GPTQ export, stay plain GPTQ."""
    def declared(d):
        q = json.loads((here / d / "quantize_config.json").read_text())
        c = json.loads((here / d / "config.json").read_text())["quantization_config"]
        assert (q["quant_method"], q["checkpoint_format"]) == (c["quant_method"], c["checkpoint_format"])
        return q["checkpoint_format"]

    assert declared("runs/mu/merged") == "lotaqaf_float_zero"
    assert declared("runs/nomu/merged") == "gptq"
    model, _, _ = load_quantized(here / "runs/mu/merged")  # lotaqaf reads it, with its fractional zeros
    assert any(not torch.equal(q.zeros, q.zeros.round()) for q in quantized_modules(model).values())


def test_gptq_export_exact_without_offset_factor(here):
    assert main(["export", "run=runs/nomu", "--format", "gptq"]) == 0
    rep = json.loads((here / "runs/nomu/export-gptq.json").read_text())
    assert rep["fractional_zero_points"] == 0 and rep["max_abs_logit_diff"] == 0.0
    m, _, _ = load_quantized(here / "runs/nomu/export-gptq")
    merged, _, _ = load_quantized(here / "runs/nomu/merged")
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, merged(ids).logits)


def test_gptq_export_with_offset_factor_needs_allow_lossy(here, capsys):
    one_line_error(capsys, ["export", "run=runs/mu", "--format", "gptq"], "--allow-lossy")
    assert not (here / "runs/mu/export-gptq").exists()
    assert main(["export", "run=runs/mu", "--format", "gptq", "--allow-lossy"]) == 0
    rep = json.loads((here / "runs/mu/export-gptq.json").read_text())
    assert rep["fractional_zero_points"] > 0 and rep["max_abs_logit_diff"] > 0.0
    one_line_error(capsys, ["export", "run=runs/mu", "--format", "gptq", "--allow-lossy"], "already exists")


def test_hf16_export(here):
    from transformers import AutoModelForCausalLM

    assert main(["export", "run=runs/mu", "--format", "hf16"]) == 0
    rep = json.loads((here / "runs/mu/export-hf16.json").read_text())
    assert rep["max_abs_logit_diff"] < 1e-4
    dense = AutoModelForCausalLM.from_pretrained(str(here / "runs/mu/export-hf16"))
    merged, _, _ = load_quantized(here / "runs/mu/merged")
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (dense(ids).logits - merged(ids).logits).abs().max().item() < 1e-4
