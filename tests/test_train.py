"""The train stage on the smoke recipe: adapter files, and resume after SIGKILL and SIGTERM."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import one_line_error

from lotaqaf_cli.cli import main
from lotaqaf_cli.core.quant import pack_ternary, unpack_ternary
from lotaqaf_cli.errors import LotaqafError
from lotaqaf_cli.io.adapter import check_base, read_adapter


def test_ternary_packing_roundtrip():
    g = torch.Generator().manual_seed(0)
    for shape in [(64, 8), (8, 64), (3, 5), (1, 1)]:
        t = torch.randint(-1, 2, shape, generator=g).float()
        words = pack_ternary(t)
        assert words.dtype == torch.int32 and words.numel() == -(-t.numel() // 16)
        assert torch.equal(unpack_ternary(words, shape).float(), t)


def test_adapter_for_another_base_is_refused():
    with pytest.raises(LotaqafError, match="another quantized base"):
        check_base({"base_hash": "sha256:aaa"}, "sha256:bbb", "adapter.safetensors")


@pytest.mark.parametrize("adapter", ["lota", "lora", "qalora"])
def test_smoke_training_writes_adapter(in_tmp, adapter):
    assert main(["train", "recipe=smoke", f"adapter={adapter}", "run.dir=runs/x",
                 "optim.steps=3", "optim.batch_size=2"]) == 0
    meta, tensors = read_adapter(in_tmp / "runs/x/adapter.safetensors")
    assert meta["kind"] == adapter and meta["base_hash"].startswith("sha256:")
    assert len(meta["layers"]) == 14
    if adapter == "lota":
        a = tensors["model.layers.0.self_attn.q_proj.A_T"]
        assert a.dtype == torch.int8 and a.shape == (64, 8) and set(a.unique().tolist()) <= {-1, 0, 1}
    lines = (in_tmp / "runs/x/metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3


def _train_cmd(run_dir, *extra):
    return [sys.executable, "-m", "lotaqaf_cli", "train", "recipe=smoke", f"run.dir={run_dir}",
            "stages=[quantize,train]", "optim.steps=30", "optim.save_every=3", *extra]


def _stop_after_first_checkpoint(in_tmp, run_dir, sig, env):
    """Start a training run, send ``sig`` once its first checkpoint exists; (exit code, stderr)."""
    proc = subprocess.Popen(_train_cmd(run_dir), env=env, cwd=in_tmp, stderr=subprocess.PIPE, text=True)
    ckpts = in_tmp / run_dir / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not any(ckpts.glob("step_*/state.pt")):
        time.sleep(0.005)
    time.sleep(0.05)  # let it run past the checkpoint, into unsaved steps
    proc.send_signal(sig)
    _, err = proc.communicate()
    assert not (in_tmp / run_dir / "adapter.safetensors").exists(), "run finished before the signal"
    return proc.returncode, err


def test_resume_after_sigkill_and_sigterm_is_bit_identical(in_tmp, capsys):
    """SIGKILL (nothing runs: resume from the last periodic checkpoint) and SIGTERM (a batch job's
    stop: the step ends, a checkpoint is saved, exit 143 with one line) both resume bit for bit."""
    env = {**os.environ, "LOTAQAF_QUIET": "1"}
    # the first run also fills the caches (quantized base, training data) that the others reuse;
    # its output goes to a pipe, as `lotaqaf train > log` does: plain progress lines, no live bars
    loud = {k: v for k, v in env.items() if k != "LOTAQAF_QUIET"}
    r = subprocess.run(_train_cmd("runs/full"), env=loud, cwd=in_tmp, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    log = r.stdout + r.stderr
    assert "\r" not in log and "\x1b[" not in log, "a live bar or terminal control codes in a log"
    for line in ("sampling calib text from the 16-bit model: 8 sequences", "GPTQ 4-bit g32 (gptq), per decoder "
                 "layer: 2/2 layers (100%)", "self-distilling training answers from the 16-bit model: 8/8 answers",
                 "train (lota): 30/30 steps (100%)"):
        assert line in log, (line, log)
    _, full = read_adapter(in_tmp / "runs/full/adapter.safetensors")
    assert sum(int((full[k] != 0).sum()) for k in full if k.endswith("B_T")) > 0  # training changed it

    code, _ = _stop_after_first_checkpoint(in_tmp, "runs/killed", signal.SIGKILL, env)
    assert code == -signal.SIGKILL
    code, err = _stop_after_first_checkpoint(in_tmp, "runs/termed", signal.SIGTERM, env)
    assert code == 143 and len(err.strip().splitlines()) == 1, err
    assert "interrupted by SIGTERM after step" in err and "resume=true run.dir=runs/termed" in err, err

    for run_dir in ("runs/killed", "runs/termed"):
        r = subprocess.run(_train_cmd(run_dir, "resume=true"), env=env, cwd=in_tmp, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        _, resumed = read_adapter(in_tmp / run_dir / "adapter.safetensors")
        assert full.keys() == resumed.keys()
        for k in full:
            assert torch.equal(full[k], resumed[k]), (run_dir, k)

    # resuming with a different config is refused, naming the key (in-process: no need to start one)
    one_line_error(capsys, _train_cmd("runs/killed", "resume=true", "adapter.omega=3")[3:], "adapter.omega")
    assert Path(in_tmp / "runs/killed/metrics.jsonl").read_text().count("\n") == 30


def test_gradient_checkpointing_gives_the_same_adapter(in_tmp):
    for name, gc in (("gc", "true"), ("plain", "false")):
        assert main(["train", "recipe=smoke", f"run.dir=runs/{name}", f"optim.gradient_checkpointing={gc}",
                     "stages=[quantize,train]"]) == 0
    _, a = read_adapter(in_tmp / "runs/gc/adapter.safetensors")
    _, b = read_adapter(in_tmp / "runs/plain/adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sum(int((a[k] != 0).sum()) for k in a if k.endswith("B_T")) > 0


def test_training_wraps_the_base_it_is_given(in_tmp):
    """One copy of the packed base: the train step attaches the adapters to the base the quantize step
    left (no copy), each adapter layer wrapping that base's own QuantLinear, whose packed words are not
    copied either."""
    from lotaqaf_cli.chain import run_step
    from lotaqaf_cli.config import compose
    from lotaqaf_cli.core.qlinear import quantized_modules
    from lotaqaf_cli.io.adapter import adapter_layers
    from lotaqaf_cli.io.rundir import RunDir
    from lotaqaf_cli.session import Session

    cfg = compose(["recipe=smoke", "run.dir=runs/wrap", "optim.steps=2", "optim.batch_size=2"])
    s = Session(cfg, RunDir.for_config(cfg))
    run_step(s, "quantize")
    base = s.base
    layers = {n: (m, m.qweight.data_ptr()) for n, m in quantized_modules(base).items()}
    run_step(s, "train")
    assert s.adapted is base and s.base is None
    wrapped = adapter_layers(s.adapted)
    assert len(wrapped) == 14
    for name, m in wrapped.items():
        assert m.base is layers[name][0] and m.base.qweight.data_ptr() == layers[name][1], name
