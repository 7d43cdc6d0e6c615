"""Data parallelism on torch.distributed, tested on the gloo backend with real torchrun launches.

- Two ranks train the same adapter as one process with the same global batch (optim.grad_accum=2:
  one micro-batch per rank against two in a row), bit for bit; the gradient sum of two terms is the
  same in either order. Their quantization gives the same codes (each linear is quantized by one
  rank from the same inputs).
- A two-rank run killed (SIGKILL) mid-training resumes on one rank and on two ranks to the adapter
  of an uninterrupted run: the data position in a checkpoint is global.
- Streamed quantization (a safetensors source read layer by layer, rank 0 writing) on two ranks
  gives the one-rank codes too.
- Ranks with different configs are refused, rank 0 naming the odd rank; a micro-batch count the
  ranks do not divide is refused before the group starts.
"""

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

from lotaqaf_cli.io.adapter import read_adapter
from lotaqaf_cli.io.checkpoint import quantized_tensor_hash

pytestmark = pytest.mark.slow

TRAIN = ["train", "recipe=smoke", "stages=[quantize,train]", "optim.batch_size=2", "optim.grad_accum=2",
         "optim.steps=24", "optim.save_every=1"]


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


def test_two_ranks_equal_one_and_resume_after_a_kill(tmp_path):
    one = _run(1, [*TRAIN, "run.root=r1", "run.dir=r1/run"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    reference = _adapter(tmp_path / "r1/run")

    # Two ranks, killed (SIGKILL, the whole launcher's process group) once a checkpoint exists.
    proc = subprocess.Popen(_cmd(2, [*TRAIN, "run.root=r2", "run.dir=r2/run"]), cwd=tmp_path, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    ckpts = tmp_path / "r2/run/checkpoints"
    deadline = time.time() + 300
    while not (ckpts.is_dir() and any(ckpts.glob("step_*"))) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "r2/run/adapter.safetensors").exists(), "the run finished before it was killed"
    steps = sorted(p.name for p in ckpts.glob("step_*"))
    assert steps and steps[-1] < "step_000024", steps

    # Its quantization (finished before training) gave the one-process codes.
    assert _quantized(tmp_path / "r2") == _quantized(tmp_path / "r1")

    shutil.copytree(tmp_path / "r2/run", tmp_path / "r2/again")
    for ranks, run in ((1, "r2/run"), (2, "r2/again")):
        res = _run(ranks, [*TRAIN, "run.root=r2", f"run.dir={run}", "resume=true"], tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        assert _same(_adapter(tmp_path / run), reference), f"resumed on {ranks} rank(s): adapter differs"


def test_micro_batches_not_divisible_by_ranks_is_one_line(tmp_path):
    res = _run(2, ["train", "recipe=smoke", "optim.grad_accum=3"], tmp_path)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith(("lotaqaf:", "lotaqaf ("))]  # not torchrun's summary
    assert res.returncode != 0
    assert len(lines) == 1 and "optim.grad_accum=3 is not a multiple of the 2 ranks" in lines[0], res.stderr[-2000:]
    assert not (tmp_path / "runs").exists()


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
