"""Data parallelism on torch.distributed, tested on the gloo backend with real torchrun launches.

- Two ranks train the same adapter as one process with the same global batch (optim.grad_accum=2:
  one micro-batch per rank against two in a row), bit for bit; the gradient sum of two terms is the
  same in either order. Their quantization gives the same codes (each linear is quantized by one
  rank from the same inputs).
- A two-rank run killed (SIGKILL to the launcher and its workers, as a scheduler does) mid-training
  resumes on one rank and on two ranks to the adapter of an uninterrupted run: the data position in a
  checkpoint is global. The two-rank resume runs the whole chain (ppl, merge, eval on rank 0 after the
  other rank has left): its perplexity table, certificate and eval equal one process's.
- A rank whose launcher dies stops by itself (torchrun starts workers in sessions of their own, so a
  kill of the launcher's process group does not reach them).
- Streamed quantization (a safetensors source read layer by layer, rank 0 writing) on two ranks
  gives the one-rank codes too.
- Ranks with different configs are refused, rank 0 naming the odd rank; a micro-batch count the
  ranks do not divide is refused before the group starts.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import one_line_error

from lotaqaf_cli.io.adapter import read_adapter
from lotaqaf_cli.io.checkpoint import quantized_tensor_hash

pytestmark = pytest.mark.slow

STEPS = ["train", "recipe=smoke", "optim.batch_size=2", "optim.grad_accum=2", "optim.steps=24", "optim.save_every=1"]
TRAIN = [*STEPS, "stages=[quantize,train]"]
CHAIN = [*STEPS, "stages=[quantize,train,ppl,merge,eval]", "eval.tasks=[ppl]"]   # every stage smoke can run


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(ranks: int, args: list[str]) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "lotaqaf_cli", *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={_port()}",
            "-m", "lotaqaf_cli", *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "LOTAQAF_QUIET": "1"}


def _run(ranks: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(ranks, args), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def _adapter(run: Path) -> dict:
    return read_adapter(run / "adapter.safetensors")[1]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _quantized(root: Path) -> str:
    (d,) = [p for p in (root / "_cache" / "quantized").iterdir() if not p.name.startswith(".")]
    return quantized_tensor_hash(d)


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we read
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    """Running, not ended (a killed orphan may stay a zombie until init reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.time() + timeout_s
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _results(run: Path) -> dict:
    """What a run reports, less timings and the run's own path."""
    ppl = json.loads((run / "ppl.json").read_text())
    cert = json.loads((run / "merge_certificate.json").read_text())
    ev = json.loads((run / "eval-merged.json").read_text())
    for r in ppl["results"].values():
        r.pop("seconds")
    cert.pop("seconds")
    ev.pop("run")
    return {"ppl": ppl, "certificate": cert, "eval": ev}


def test_two_ranks_equal_one_and_resume_after_a_kill(tmp_path):
    one = _run(1, [*CHAIN, "run.root=r1", "run.dir=r1/run"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    reference = _adapter(tmp_path / "r1/run")

    # Two ranks, killed once a checkpoint exists: SIGKILL to the launcher and to its workers (torchrun starts
    # them in sessions of their own), then nothing of the run may be alive before its files are copied.
    proc = subprocess.Popen(_cmd(2, [*TRAIN, "run.root=r2", "run.dir=r2/run"]), cwd=tmp_path, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    ckpts = tmp_path / "r2/run/checkpoints"
    deadline = time.time() + 300
    while not (ckpts.is_dir() and any(ckpts.glob("step_*"))) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    workers = _children(proc.pid)
    for pid in [proc.pid, *workers]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert len(workers) == 2 and not _wait_gone(workers, 30), workers
    assert not (tmp_path / "r2/run/adapter.safetensors").exists(), "the run finished before it was killed"
    steps = sorted(p.name for p in ckpts.glob("step_*"))
    assert steps and steps[-1] < "step_000024", steps

    # Its quantization (finished before training) gave the one-process codes.
    assert _quantized(tmp_path / "r2") == _quantized(tmp_path / "r1")

    shutil.copytree(tmp_path / "r2/run", tmp_path / "r2/again")
    for ranks, run, args in ((1, "r2/run", TRAIN), (2, "r2/again", CHAIN)):
        res = _run(ranks, [*args, "run.root=r2", f"run.dir={run}", "resume=true"], tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        assert _same(_adapter(tmp_path / run), reference), f"resumed on {ranks} rank(s): adapter differs"
    # The whole chain under torchrun: rank 0 ran ppl, merge and eval alone, to one process's numbers.
    assert _results(tmp_path / "r2/again") == _results(tmp_path / "r1/run")
    assert json.loads((tmp_path / "r2/again/status.json").read_text())["state"] == "done"


WATCHED = """
import sys, time
from lotaqaf_cli import dist
dist.watch_launcher(interval_s=0.05)
print("watching", flush=True)
time.sleep(60)
"""
LAUNCHER = f"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", {WATCHED!r}], start_new_session=True, stdout=subprocess.PIPE,
                         stderr=open(sys.argv[1], "w"), text=True)
assert child.stdout.readline() == "watching\\n"
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_rank_stops_when_its_launcher_is_killed(tmp_path):
    """What torchrun's workers do when the launcher gets SIGKILL: nothing reaches them but the lost parent."""
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path / "err")], stdout=subprocess.PIPE,
                                text=True, start_new_session=True)
    worker = int(launcher.stdout.readline())
    assert _alive(worker)
    launcher.kill()
    launcher.wait()
    left = _wait_gone([worker], 10)
    for pid in left:  # no stray process, whatever the outcome
        os.kill(pid, signal.SIGKILL)
    assert not left, "the worker outlived its launcher"
    assert "the launcher" in (tmp_path / "err").read_text() and "is gone: stopping" in (tmp_path / "err").read_text()


def test_micro_batches_not_divisible_by_ranks_is_one_line(in_tmp, capsys, monkeypatch):
    """Refused before the group starts, so rank 0 of a two-rank launch is enough: the variables torchrun
    sets, in this process (nothing listens on MASTER_PORT: joining the group would fail)."""
    for var, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_port()), "TORCHELASTIC_RUN_ID": "test"}.items():
        monkeypatch.setenv(var, value)
    one_line_error(capsys, ["train", "recipe=smoke", "optim.grad_accum=3"],
                   "optim.grad_accum=3 is not a multiple of the 2 ranks", prefix="lotaqaf (rank 0): error: ")
    assert not (in_tmp / "runs").exists()


def _rank_main(rank: int, init: str, out: str) -> None:
    import torch.distributed as td

    from lotaqaf_cli import dist
    from lotaqaf_cli.errors import LotaqafError

    td.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        x = [torch.tensor([1.0 + rank, 2.0]), torch.tensor([[rank * 0.5]])]
        dist.all_reduce_sum(x)
        try:
            dist.same_on_all(f"config {rank}", "the resolved config")
            err = None
        except LotaqafError as e:
            err = (type(e).__name__, str(e))
        torch.save({"sum": x, "err": err}, f"{out}/{rank}.pt")
    finally:
        td.destroy_process_group()


def test_all_reduce_and_config_mismatch_on_gloo(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    for r in (r0, r1):
        assert torch.equal(r["sum"][0], torch.tensor([3.0, 4.0])) and torch.equal(r["sum"][1], torch.tensor([[0.5]]))
    assert r0["err"][0] == "LotaqafError" and "differs between ranks (rank 1 vs rank 0)" in r0["err"][1]
    assert r1["err"][0] == "Relayed"   # rank 1 stops too, silently: rank 0 says it


def test_streamed_quantization_on_two_ranks_equals_one(tmp_path):
    from tiny_models import corpus, random_model_dir

    model = random_model_dir(tmp_path / "m", layers=2, hidden=128, intermediate=256, shard_mb=0.5)
    (tmp_path / "text.txt").write_text("\n".join(corpus()) + "\n")
    args = ["quantize", "recipe=smoke", f"model.path={model}", "calib=file", "calib.path=text.txt",
            "calib.n_samples=4", "calib.seq_len=32", "quant.batch_size=2"]
    for ranks in (1, 2):
        res = _run(ranks, [*args, f"run.root=s{ranks}"], tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
    assert (next((tmp_path / "s2/_cache/quantized").iterdir()) / "model.safetensors.index.json").is_file()
    assert _quantized(tmp_path / "s2") == _quantized(tmp_path / "s1")
