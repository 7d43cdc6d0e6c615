"""Streamed quantization (quant.stream): the source read from its safetensors shards one decoder
layer at a time, each quantized layer written as its own shard.

- The codes (and every other quantized tensor) equal those of the in-memory path on the same model
  and calibration, for plain GPTQ and for act-order + true-sequential.
- Peak resident memory (the quantize stage's VmHWM), measured in a fresh process, does not grow
  with the number of layers: a
  random-weight model with 12 layers peaks within two layers' size of the same model with 2 layers
  (the in-memory path grows by about two layers per layer: the loaded model and its quantized copy).
- A shard that cannot be read ends in one line, exit 2, and no half-written checkpoint (a source
  without safetensors and quant.stream=true: tests/test_errors.py).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import one_line_error, run_commands_in
from tiny_models import corpus, random_model_dir, tiny_model_dir

from lotaqaf_cli.io.checkpoint import load_quantized, quantized_tensor_hash

SMALL = ["calib=file", "calib.path=text.txt", "calib.n_samples=4", "calib.seq_len=32", "quant.batch_size=2"]


def _quantized_dir(root: Path) -> Path:
    (d,) = [p for p in (root / "_cache" / "quantized").iterdir() if not p.name.startswith(".")]
    return d


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    (root / "text.txt").write_text("\n".join(corpus()) + "\n")
    return root, tiny_model_dir(root / "tiny")


@pytest.mark.parametrize("extra", [[], ["quant.act_order=true", "quant.true_sequential=true", "quant.bits=3"]])
def test_streamed_codes_equal_in_memory(tiny, extra):
    root, model = tiny
    tag = str(len(extra))
    for stream in ("true", "false"):
        run_commands_in(root, [["quantize", "recipe=smoke", f"model.path={model}", f"quant.stream={stream}",
                                f"run.root=r{stream}{tag}", *SMALL, *extra]])
    streamed, in_memory = _quantized_dir(root / f"rtrue{tag}"), _quantized_dir(root / f"rfalse{tag}")
    assert (streamed / "model.safetensors.index.json").is_file()      # written shard by shard
    assert (in_memory / "model.safetensors").is_file()                # written at once
    assert quantized_tensor_hash(streamed) == quantized_tensor_hash(in_memory)
    a, _, ia = load_quantized(streamed)
    b, _, ib = load_quantized(in_memory)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)   # norms and embeddings too
    assert ia["content_hash"] != ib["content_hash"]  # different files, the same model
    rec = [json.loads(next((root / f"r{s}{tag}" / "smoke").glob("*/quantize.json")).read_text()) for s in ("true", "false")]
    assert rec[0]["streamed"] and not rec[1]["streamed"]
    assert [x["gptq_error"] for x in rec[0]["layers"]] == [x["gptq_error"] for x in rec[1]["layers"]]


def test_unreadable_shard_one_line_and_no_checkpoint(tiny, tmp_path, capsys, monkeypatch):
    root, _ = tiny
    model = random_model_dir(tmp_path / "m", layers=2, hidden=128, intermediate=256, shard_mb=0.5)
    shards = sorted(model.glob("model-*.safetensors"))
    assert len(shards) >= 2
    shards[-1].write_bytes(shards[-1].read_bytes()[:1000])           # truncated: the last layer's shard
    monkeypatch.chdir(root)
    one_line_error(capsys, ["quantize", "recipe=smoke", f"model.path={model}", "run.root=rbad", *SMALL],
                   "corrupted or truncated")
    cache = root / "rbad" / "_cache" / "quantized"
    assert not cache.exists() or not any(cache.iterdir())            # no checkpoint, not even a temporary one


DRIVER = """
import json, sys
from lotaqaf_cli.cli import main
rc = main(sys.argv[1:])
# VmHWM, not ru_maxrss: the latter keeps the launching process's resident set from before exec
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"rc": rc, "peak_mb": hwm / 1024}))
"""


def _peak_mb(model: Path, root: Path, run_root: str) -> float:
    args = ["quantize", "recipe=smoke", f"model.path={model}", "quant.stream=true", "device=cpu",
            f"run.root={run_root}", *SMALL]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LOTAQAF_KERNELS")}  # as a user runs it
    env.update(OMP_NUM_THREADS="1", LOTAQAF_QUIET="1")
    out = subprocess.run([sys.executable, "-c", DRIVER, *args], capture_output=True, text=True, env=env, cwd=root,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["rc"] == 0
    return res["peak_mb"]


@pytest.mark.slow
def test_streamed_peak_memory_does_not_grow_with_layers(tiny, tmp_path):
    root, _ = tiny
    hidden, inter = 512, 1408
    layer_mb = (3 * hidden * hidden + 3 * hidden * inter) * 4 / 2**20    # q, o + k, v at half width; MLP
    peaks = {n: _peak_mb(random_model_dir(tmp_path / f"m{n}", n, hidden, inter, shard_mb=40), root, f"mem{n}")
             for n in (2, 12)}
    # The bound: whatever 2 layers need, 12 layers need less than two more layers' fp32 weights plus
    # 16 MB of allocator noise. Holding the model would add 10 layers (the in-memory path: 20).
    assert peaks[12] <= peaks[2] + 2 * layer_mb + 16, (peaks, layer_mb)
