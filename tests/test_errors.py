"""The bad-input catalogue: every input a user can get wrong, across every command, ends in exactly
one line on stderr (`lotaqaf: error: ...`), exit code 2 (130 / 143 for an interruption), no
traceback, and no new files (or, where a run had already started, only complete ones).

docs/errors.md lists these cases with their messages (a test below keeps the two in step).
"""

import errno
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import copy_smoke_run, one_line_error, run_commands_in

from lotaqaf_cli.cli import main
from lotaqaf_cli.io.adapter import read_adapter
from lotaqaf_cli.io.rundir import CONFIG, find_run

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
SMOKE = ["recipe=smoke", "stages=[quantize,train]"]


def _jsonl(lines):
    return "".join(ln + "\n" for ln in lines)


# Files a case needs in its working directory (name -> content; a name ending in / is a directory).
FILES = {
    "afile": "not a directory\n",
    "fake.gguf": "this is not a GGUF file\n",
    "emptydir/": None,
    "bad.jsonl": _jsonl(['{"instruction": "a", "output": "b"}', '{"instruction": "c", "output": "d"']),
    "noanswer.jsonl": _jsonl(['{"instruction": "a", "output": ""}']),
    "sqlrows.jsonl": _jsonl(['{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "SELECT 1"}]}']),
    "viggorows.jsonl": _jsonl(['{"meaning_representation": "inform(name[A])", "target": "A.", "references": ["A."]}']),
}

# (case id, argv, what the one line must contain). RUN stands for a trained, merged smoke run.
CASES = [
    # train / quantize: composition and the schema
    ("unknown recipe", ["train", "recipe=nope"], "unknown recipe 'nope'; valid: llama33_70b_mmlu"),
    ("unknown key", ["train", "recipe=smoke", "quant.bitz=3"], "nearest valid keys: quant.bits"),
    ("added unknown key", ["train", "recipe=smoke", "+foo=1"], "unknown config key 'foo'"),
    ("not key=value", ["train", "recipe=smoke", "bits"], "expected key=value, got 'bits'"),
    ("wrong type", ["train", "recipe=smoke", "seed=abc"], "seed='abc' is not allowed: expected an integer >= 0"),
    ("wrong bool", ["train", "recipe=smoke", "resume=maybe"], "resume='maybe' is not allowed: expected true or false"),
    ("bad bits", ["quantize", "recipe=smoke", "quant.bits=5"], "quant.bits=5 is not allowed: expected one of 2, 3, 4, 8"),
    ("bad method", ["quantize", "recipe=smoke", "quant.method=awq"], "expected one of gptq, rtn, nf4"),
    ("bad damp", ["quantize", "recipe=smoke", "quant.damp_percent=1.5"], "quant.damp_percent=1.5 is not allowed"),
    ("bad stage", ["train", "recipe=smoke", "stages=[quantize,bogus]"], "stages=['quantize', 'bogus'] is not allowed"),
    ("bad device", ["train", "recipe=smoke", "device=gpu"], "expected one of auto, cpu, cuda"),
    ("bad kernels", ["train", "recipe=smoke", "kernels=cuda"], "kernels='cuda' is not allowed: expected one of auto, triton, torch"),
    ("bad precision", ["train", "recipe=smoke", "precision=fp16"], "precision='fp16' is not allowed: expected one of auto, bf16, fp32"),
    ("bad calibration activations", ["quantize", "recipe=smoke", "quant.activations=gpu"], "quant.activations='gpu' is not allowed: expected one of auto, device, host"),
    ("omega >= rank", ["train", "recipe=smoke", "adapter.omega=8"], "omega must lie in (0, rank)"),
    ("omega 0", ["train", "recipe=smoke", "adapter.omega=0"], "adapter.omega=0 is not allowed: expected a number > 0"),
    ("rank 0", ["train", "recipe=smoke", "adapter.rank=0"], "adapter.rank=0 is not allowed"),
    ("unknown adapter", ["train", "recipe=smoke", "adapter=nope"], "valid: lora, lota, qalora, scales, zeros"),
    ("unknown optimizer", ["train", "recipe=smoke", "optim=nope"], "valid: adamw, tsignsgd"),
    ("lora with t-SignSGD", ["train", "recipe=smoke", "adapter=lora", "optim=tsignsgd"],
     "adapter=lora trains with optim=adamw"),
    ("bad schedule", ["train", "recipe=smoke", "optim.schedule=2.0"], "or a number in (0, 1]"),
    ("scales on an NF4 base", ["train", "recipe=smoke", "quant=nf4", "adapter=scales"],
     "adapter=scales needs a GPTQ base (quant=gptq): quant=nf4 is QLoRA's base"),
    ("NF4 at 2 bits", ["train", "recipe=smoke", "quant=nf4", "adapter=lora", "quant.bits=2"],
     "quant=nf4 is 4-bit: quant.bits=2 is not allowed with it"),
    ("scales told to train zeros", ["train", "recipe=smoke", "adapter=scales", "adapter.train=[zeros]"],
     "adapter.train=['zeros'] does not fit adapter=scales"),
    ("unknown trained parameter", ["train", "recipe=smoke", "adapter=zeros", "adapter.train=[offsets]"],
     "adapter.train=['offsets'] is not allowed: expected a non-empty list of"),
    ("negative limit", ["train", "recipe=smoke", "eval.limit=-1"], "eval.limit=-1 is not allowed"),
    ("markers off and no offset", ["train", "recipe=smoke", "adapter.markers=false",
                                   "adapter.offset_granularity=none"], "leaves the adapter no effect"),
    ("stream without safetensors", ["quantize", "recipe=smoke", "quant.stream=true"],
     "quant.stream=true needs safetensors weights"),
    # the memory plan, before any work
    ("bad plan device", ["plan", "recipe=smoke", "plan.device_gb=0"], "plan.device_gb=0 is not allowed"),
    ("stage over the device", ["train", "recipe=smoke", "plan.device_gb=0.2"], "the quantize stage needs about"),
    # shipped data (recipe smollm2_mmlu), checked before the model loads
    ("shipped data, other model", ["train", "recipe=smoke", "calib=shipped"],
     "calib.source=shipped: lotaqaf ships data only for embedded:smollm2 (model is smoke)"),
    ("shipped data, too many windows", ["quantize", "recipe=smollm2_mmlu", "calib.n_samples=64"],
     "calib.source=shipped has 32 windows x 256 tokens; calib.n_samples=64 calib.seq_len=256 asks for more"),
    ("shipped data, other seed", ["train", "recipe=smollm2_mmlu", "data.seed=8"],
     "data.source=shipped was sampled with data.seed=7; data.seed=8 needs data=self_distill"),
    # paths, before any work
    ("run root not creatable", ["train", "recipe=smoke", "run.root=/proc/x"], "run.root=/proc/x: cannot create it"),
    ("run root under a file", ["train", "recipe=smoke", "run.root=afile/x"], "afile is not a directory"),
    ("missing model", ["quantize", "recipe=smoke", "model.path=./no/such/model"], "model path does not exist"),
    ("fake gguf", ["quantize", "recipe=smoke", "model.path=fake.gguf"], "cannot read GGUF file"),
    ("empty model dir", ["quantize", "recipe=smoke", "model.path=emptydir"], "holds no config.json"),
    ("hub model offline", ["quantize", "recipe=llama3_mmlu"], "to run offline use recipe=smollm2_mmlu"),
    ("calib file unset", ["quantize", "recipe=smoke", "calib=file"], "calib.path must be set"),
    ("calib file missing", ["quantize", "recipe=smoke", "calib=file", "calib.path=none.txt"],
     "calib.path=none.txt: no such file"),
    ("data file missing", ["train", *SMOKE, "data=jsonl", "data.path=none.jsonl"], "data.path=none.jsonl: no such file"),
    # settings checked from the model's config and data read before the weights load
    ("group size", ["quantize", "recipe=smoke", "quant.group_size=48"],
     "quant.group_size=48 does not divide the input size 64 of q_proj"),
    ("malformed JSONL", ["train", *SMOKE, "data=jsonl", "data.path=bad.jsonl"],
     "bad.jsonl:2: invalid JSON (Expecting ',' delimiter at column 35)"),
    ("empty answer", ["train", *SMOKE, "data=jsonl", "data.path=noanswer.jsonl"],
     "noanswer.jsonl:1: the record has an empty \"output\""),
    ("SQL data unset", ["train", *SMOKE, "data=sql"], "data=sql needs data.path=FILE: the paper's SQL data is HALO's"),
    ("SQL data in another layout", ["train", *SMOKE, "data=sql", "data.path=viggorows.jsonl"],
     "viggorows.jsonl:1: not a SQL row: no 'messages'"),
    # merge
    ("merge: no such run", ["merge", "run=runs/none"], "run directory does not exist: runs/none"),
    ("merge: no run yet", ["merge"], "no run with a trained adapter under runs/"),
    ("merge: unknown key", ["merge", "run=RUN", "merge.verifyy=false"], "nearest valid keys: merge.verify"),
    ("merge: merged already", ["merge", "run=RUN"], "already exists: remove it to merge again"),
    ("merge: truncated adapter", ["merge", "run=COPY"], "cannot read adapter copy/adapter.safetensors: corrupted"),
    # eval
    ("eval: unknown task", ["eval", "run=RUN", "--tasks", "viggoo"],
     "unknown eval task 'viggoo': neither lotaqaf's (mmlu, ppl, gsm8k, sql, viggo) nor lm-eval's; close: viggo"),
    ("eval: SQL without its file", ["eval", "run=RUN", "--tasks", "sql"], "sql needs eval.sql_file=FILE (--sql-file)"),
    ("eval: ViGGO file in another layout", ["eval", "run=RUN", "--tasks", "viggo", "--viggo-file", "sqlrows.jsonl"],
     "sqlrows.jsonl:1: not a ViGGO row: no 'meaning_representation', 'target'"),
    ("eval: ViGGO offline", ["eval", "run=RUN", "--tasks", "viggo"], "--viggo-file FILE.jsonl"),
    ("eval: lm-eval include not a folder", ["eval", "run=RUN", "eval.lm_eval_include=afile"],
     "eval.lm_eval_include=afile: not a directory of lm-eval task files"),
    ("eval: no such model", ["eval", "--model", "./nowhere"], "--model ./nowhere: no such path"),
    ("eval: negative limit", ["eval", "run=RUN", "--limit", "-1"], "eval.limit=-1 is not allowed"),
    ("eval: missing GSM8K file", ["eval", "run=RUN", "--tasks", "gsm8k", "--gsm8k-file", "none.jsonl"],
     "eval.gsm8k_file=none.jsonl: no such file"),
    ("eval: not a model directory", ["eval", "--model", "emptydir"], "--model emptydir is not a model directory"),
    ("eval: GSM8K offline", ["eval", "run=RUN", "--tasks", "gsm8k"], "--gsm8k-file"),
    ("eval: unknown key", ["eval", "run=RUN", "eval.limt=2"], "nearest valid keys: eval.limit"),
    # export
    ("export: unknown key", ["export", "run=RUN", "export.formatt=gguf"], "nearest valid keys: export.format"),
    ("export: no format", ["export", "run=RUN"], "export needs --format"),
    ("export: unknown format", ["export", "run=RUN", "--format", "zip"], "export.format='zip' is not allowed"),
    ("export: GPTQ without the offset branch", ["export", "run=RUN", "--format", "gptq", "export.offset_branch=false"],
     "Exact instead: --format gptq (with its offset branch) or --format gguf or torchao or hf16"),
    ("export: GGUF K-quant without --allow-lossy", ["export", "run=RUN", "--format", "gguf", "export.gguf_type=q2_k"],
     "export.gguf_type=q2_k changes the model"),
    ("export: an exact adapter unmerged", ["export", "run=RUN", "--format", "gptq", "export.source=adapter"],
     "this run's adapter is lota, which merges exactly: export its merged model"),
    ("export: unmerged adapter as torchao", ["export", "run=RUN", "--format", "torchao", "export.source=adapter"],
     "export.source=adapter writes a LoRA-type run unmerged: --format gptq"),
    ("export: no such engine interpreter", ["export", "run=RUN", "--format", "gguf", "export.check_python=nope/python"],
     "export.check_python=nope/python: no such file"),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, smoke_lota_root):
    """The session's smoke run, merged, for the merge / eval / export cases."""
    root = copy_smoke_run(smoke_lota_root, tmp_path_factory.mktemp("trained"), "runs/ok")
    return run_commands_in(root, [["merge", "run=runs/ok"]]) / "runs/ok"


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("case,argv,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, argv, needle, capsys, tmp_path, monkeypatch, trained):
    monkeypatch.chdir(tmp_path)
    for name, text in FILES.items():
        (tmp_path / name).mkdir() if name.endswith("/") else (tmp_path / name).write_text(text)
    if "run=COPY" in argv:
        shutil.copytree(trained, tmp_path / "copy")
        adapter = tmp_path / "copy/adapter.safetensors"
        adapter.write_bytes(adapter.read_bytes()[:-100])
        shutil.rmtree(tmp_path / "copy/merged")
    argv = [{"run=RUN": f"run={trained}", "run=COPY": "run=copy"}.get(a, a) for a in argv]
    before, run_before = _tree(tmp_path), _tree(trained)
    err = one_line_error(capsys, argv)
    assert needle in err, err
    assert _tree(tmp_path) == before, "a refused command left files behind"
    assert _tree(trained) == run_before


def test_docs_list_every_case():
    doc = DOC.read_text()
    missing = [case for case, _, _ in CASES if f"| {case} |" not in doc]
    assert not missing, f"docs/errors.md lacks the cases {missing}"
    assert "| SIGINT during training |" in doc and "| disk full while writing |" in doc


def _adapter(path):
    return read_adapter(path)[1]


def test_sigint_during_training_resumes_bit_identical(capsys, tmp_path, monkeypatch):
    """Ctrl-C mid-training: the step ends, a checkpoint is written, exit 130 with one line that says
    how to continue; resuming gives the adapter of an uninterrupted run, bit for bit."""
    monkeypatch.chdir(tmp_path)
    train = ["train", *SMOKE, "optim.steps=40", "optim.save_every=7"]
    assert main([*train, "run.dir=runs/full"]) == 0

    ckpts = tmp_path / "runs/cut/checkpoints"

    def interrupt_after_first_checkpoint():
        deadline = time.time() + 120
        while time.time() < deadline and not any(ckpts.glob("step_*/state.pt")):
            time.sleep(0.002)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_after_first_checkpoint, daemon=True).start()
    err = one_line_error(capsys, [*train, "run.dir=runs/cut"], code=130, prefix="lotaqaf: interrupted by SIGINT")
    assert "after step" in err and "resume=true run.dir=runs/cut" in err, err
    status = json.loads((tmp_path / "runs/cut/status.json").read_text())
    assert status["state"] == "interrupted" and status["stage"] == "train"
    steps = [int(p.name.split("_")[1]) for p in ckpts.glob("step_*")]
    assert max(steps) < 40 and not (tmp_path / "runs/cut/adapter.safetensors").exists()
    assert not list((tmp_path / "runs").rglob(".*tmp*")), "a temporary file was left behind"

    assert main([*train, "run.dir=runs/cut", "resume=true"]) == 0
    full, resumed = _adapter(tmp_path / "runs/full/adapter.safetensors"), _adapter(
        tmp_path / "runs/cut/adapter.safetensors")
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    assert sum(int((full[k] != 0).sum()) for k in full if k.endswith("B_T")) > 0
    assert json.loads((tmp_path / "runs/cut/status.json").read_text())["state"] == "done"


def test_disk_full_while_writing_is_one_line_and_the_run_is_marked_failed(capsys, tmp_path, monkeypatch):
    """An OSError while writing an artifact (here: no space left while writing the adapter) names the
    path and the cause; no half-written file is left, and the failed run is never the "newest run"."""
    import safetensors.torch

    monkeypatch.chdir(tmp_path)
    assert main(["train", *SMOKE, "optim.steps=2", "run.dir=runs/smoke/1-good"]) == 0
    real = safetensors.torch.save_file

    def full_disk(tensors, filename, metadata=None):
        if "adapter" in str(filename):
            Path(filename).write_bytes(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    err = one_line_error(capsys, ["train", *SMOKE, "optim.steps=2", "run.dir=runs/smoke/2-full"])
    assert err.endswith("runs/smoke/2-full/adapter.safetensors: No space left on device"), err
    failed = tmp_path / "runs/smoke/2-full"
    assert not (failed / "adapter.safetensors").exists() and not list(failed.glob(".*tmp*"))
    assert json.loads((failed / "status.json").read_text())["state"] == "failed"
    os.utime(failed / CONFIG)  # the failed run is the most recent one
    assert find_run(None, "runs", CONFIG).path.name == "1-good"
