"""`lotaqaf merge` on the smoke recipe: certificate, unmerge, and the user errors."""

import json
import shutil

import pytest
from cli_helpers import copy_smoke_run, one_line_error, run_commands_in

from lotaqaf_cli.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory, smoke_lota_root):
    """The session's LoTA-QAF smoke run (runs/smoke/a) beside a LoRA one trained here."""
    root = copy_smoke_run(smoke_lota_root, tmp_path_factory.mktemp("merge"))
    return run_commands_in(root, [
        ["train", "recipe=smoke", "run.dir=runs/smoke/lora", "adapter=lora", "optim=adamw",
         "optim.lr=0.01", "optim.steps=6", "stages=[quantize,train]"]])


@pytest.fixture
def work(trained, tmp_path, monkeypatch):
    shutil.copytree(trained / "runs", tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_merge_certificate_and_unmerge(work):
    assert main(["merge", "run=runs/smoke/a"]) == 0
    cert = json.loads((work / "runs/smoke/a/merge_certificate.json").read_text())
    assert cert["max_abs_logit_diff"] == 0.0 and cert["max_abs_layer_diff_from_disk"] == 0.0 and cert["exact"]
    assert cert["codes"]["plus"] + cert["codes"]["minus"] > 0
    assert cert["perplexity"]["change"] == 0.0
    assert main(["merge", "run=runs/smoke/a", "--unmerge"]) == 0
    assert json.loads((work / "runs/smoke/a/unmerge.json").read_text())["identical"] is True


def test_eval_stage_alone_loads_the_merged_model(work):
    """`lotaqaf train stages=[eval]` in a fresh process on a merged run scores the merged checkpoint (the
    same perplexity the certificate measured for it)."""
    assert main(["merge", "run=runs/smoke/a"]) == 0
    args = ["train", "recipe=smoke", "run.dir=runs/smoke/a", "adapter.omega=2", "optim.steps=8",
            "stages=[eval]", "eval.tasks=[ppl]"]
    assert main(args) == 0
    out = json.loads((work / "runs/smoke/a/eval-merged.json").read_text())
    cert = json.loads((work / "runs/smoke/a/merge_certificate.json").read_text())
    assert out["ppl"]["ppl"] == cert["perplexity"]["merged"], (out, cert["perplexity"])


def test_merge_newest_run_by_default(work):
    assert main(["merge"]) == 0
    assert any((work / "runs/smoke").glob("*/merged/model-*.safetensors"))


def test_lora_merge_reports_its_loss(work):
    assert main(["merge", "run=runs/smoke/lora"]) == 0
    cert = json.loads((work / "runs/smoke/lora/merge_certificate.json").read_text())
    assert cert["kind"] == "lora" and cert["max_abs_logit_diff"] > 0.0


def test_merge_errors(work, capsys):
    (work / "runs/empty").mkdir()
    one_line_error(capsys, ["merge", "run=runs/empty"], "no adapter.safetensors")
    one_line_error(capsys, ["merge", "run=runs/nope"], "does not exist")
    # an adapter bound to another base
    other = work / "runs/smoke/other"
    shutil.copytree(work / "runs/smoke/a", other)
    q = json.loads((other / "quantize.json").read_text())
    lora_q = json.loads((work / "runs/smoke/lora/quantize.json").read_text())
    assert q["content_hash"] == lora_q["content_hash"]  # same base: use a differently quantized one
    assert main(["quantize", "recipe=smoke", "quant.bits=3", "run.dir=runs/smoke/b3"]) == 0
    q["checkpoint"] = json.loads((work / "runs/smoke/b3/quantize.json").read_text())["checkpoint"]
    (other / "quantize.json").write_text(json.dumps(q))
    capsys.readouterr()
    one_line_error(capsys, ["merge", f"run={other}"], "trained on another quantized base")
    assert not (other / "merged").exists()
    # a corrupted adapter file
    bad = work / "runs/smoke/bad"
    shutil.copytree(work / "runs/smoke/a", bad)
    f = bad / "adapter.safetensors"
    f.write_bytes(f.read_bytes()[:200])
    one_line_error(capsys, ["merge", f"run={bad}"], "corrupted")
    assert not (bad / "merged").exists()
    # an existing output directory
    assert main(["merge", "run=runs/smoke/a"]) == 0
    capsys.readouterr()
    one_line_error(capsys, ["merge", "run=runs/smoke/a"], "already exists")


def test_eval_merged_equals_adapter(work):
    assert main(["merge", "run=runs/smoke/a"]) == 0
    for which in ("adapter", "merged", "gptq"):
        assert main(["eval", "run=runs/smoke/a", "--tasks", "ppl", "--model", which]) == 0
    ppl = {w: json.loads((work / f"runs/smoke/a/eval-{w}.json").read_text())["ppl"]["ppl"]
           for w in ("adapter", "merged", "gptq")}
    assert ppl["adapter"] == ppl["merged"]
