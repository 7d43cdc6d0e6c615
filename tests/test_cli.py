"""The command line: composition, flags, the smoke chain (bad input: tests/test_errors.py)."""

import json
import shutil

import pytest
import yaml
from cli_helpers import one_line_error

from lotaqaf_cli.cli import main

pytestmark = pytest.mark.usefixtures("in_tmp")  # every test runs in its own temporary directory


def test_cfg_prints_resolved_config(capsys):
    assert main(["train", "recipe=llama3_mmlu", "quant.bits=3", "--cfg"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["path"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert cfg["quant"] == {**cfg["quant"], "bits": 3, "group_size": 64}
    assert cfg["adapter"]["rank"] == 64 and cfg["adapter"]["omega"] == 48 and cfg["optim"]["steps"] == 300


@pytest.mark.parametrize("recipe,group,rank,omega", [("qwen25_32b_mmlu", 128, 32, 24),
                                                     ("llama33_70b_mmlu", 128, 32, 24),
                                                     ("smollm2_mmlu", 64, 64, 48),
                                                     ("llama3_viggo", 64, 64, 56),
                                                     ("smollm2_viggo_synth", 64, 64, 56)])
def test_recipes_compose(capsys, recipe, group, rank, omega):
    assert main(["train", f"recipe={recipe}", "--cfg"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["name"] == recipe and cfg["quant"]["group_size"] == group
    assert (cfg["adapter"]["rank"], cfg["adapter"]["omega"]) == (rank, omega)


def test_recipes_listing(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in ("smollm2_mmlu", "llama3_mmlu", "qwen25_14b_mmlu", "qwen25_32b_mmlu", "llama33_70b_mmlu",
                 "llama3_gsm8k", "llama3_sql", "llama3_viggo", "smollm2_viggo_synth", "smoke"):
        assert name in out


def test_run_commands_print_their_config(capsys, in_tmp):
    """merge, eval and export are composed like train: --cfg prints the config, flags set its keys."""
    assert main(["merge", "run=runs/x", "--no-verify", "--cfg"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["run"]["dir"] == "runs/x" and cfg["merge"] == {"verify": False, "unmerge": False}
    assert main(["eval", "run=runs/x", "eval.limit=2", "--tasks", "mmlu,ppl", "--engine", "fast", "--cfg"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["eval"]["limit"] == 2 and cfg["eval"]["tasks"] == ["mmlu", "ppl"] and cfg["eval"]["engine"] == "fast"
    assert main(["export", "run=runs/x", "export.format=gguf", "--allow-lossy", "--cfg"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["export"] == {"format": "gguf", "allow_lossy": True, "gguf_type": "q4_1", "offset_branch": True, "source": "merged",
                             "check": True,
                             "check_python": None}


def test_smoke_chain_and_reuse(capsys, in_tmp):
    """quantize -> ppl on the smoke recipe; a second run reuses the cached base; a different
    config pointed at the same directory is refused."""
    assert main(["train", "recipe=smoke", "run.dir=runs/a"]) == 0
    q = json.loads((in_tmp / "runs/a/quantize.json").read_text())
    assert q["cached"] is False and q["settings"]["bits"] == 4
    for kind, v in q["error_by_kind"].items():
        assert v["gptq_worse_than_rtn"] == 0, kind
    ppl = json.loads((in_tmp / "runs/a/ppl.json").read_text())["results"]
    assert set(ppl) == {"16-bit", "GPTQ INT4 g32", "GPTQ + lota (adapter)"}
    assert all(r["ppl"] > 1 for r in ppl.values())
    capsys.readouterr()

    assert main(["quantize", "recipe=smoke", "run.dir=runs/b"]) == 0
    assert json.loads((in_tmp / "runs/b/quantize.json").read_text())["cached"] is True

    one_line_error(capsys, ["quantize", "recipe=smoke", "run.dir=runs/a", "quant.bits=3"],
                   "already holds a different run")

    # a corrupted GPTQ checkpoint given as the model: a clear error, not a traceback
    ckpt = shutil.copytree(q["checkpoint"], in_tmp / "user_ckpt")
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    one_line_error(capsys, ["quantize", "recipe=smoke", f"model.path={ckpt}"], "corrupted")

    # a corrupted cache entry is detected and rebuilt
    f = in_tmp / q["checkpoint"] / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    assert main(["quantize", "recipe=smoke", "run.dir=runs/c"]) == 0
    assert json.loads((in_tmp / "runs/c/quantize.json").read_text())["cached"] is False


def test_existing_gptq_checkpoint_skips_quantization(capsys, in_tmp):
    assert main(["quantize", "recipe=smoke", "run.dir=runs/a"]) == 0
    q = json.loads((in_tmp / "runs/a/quantize.json").read_text())
    assert main(["train", "recipe=smoke", f"model.path={in_tmp / q['checkpoint']}", "run.dir=runs/b"]) == 0
    assert json.loads((in_tmp / "runs/b/quantize.json").read_text())["skipped"] is True


def test_baseline_adapters_select_adamw(capsys):
    assert main(["train", "recipe=smollm2_mmlu", "adapter=qalora", "--cfg"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["adapter"]["kind"] == "qalora" and cfg["optim"]["name"] == "adamw"
    assert cfg["optim"]["max_grad_norm"] == 0.3 and cfg["optim"]["warmup_ratio"] == 0.03
