"""Peak resident memory of `lotaqaf quantize` on random-weight Llama models saved as safetensors
shards: streamed (one decoder layer at a time) vs in memory (the whole model loaded), at two depths.

    python scripts/bench_stream.py                      # hidden 1024, 2 and 10 layers (~50 MB fp32 a layer)
    python scripts/bench_stream.py --layers 4 24 --hidden 2048 --intermediate 5632
    python scripts/bench_stream.py --llama8b 4 --out DIR    # on a GPU: 4 layers of Llama-3.1-8B's shape (bf16),
                                                           # streamed; seconds per layer, peak GPU memory
    python scripts/bench_stream.py --llama8b 2 --dry-run --out DIR   # the same steps on CPU, a tiny shape

Each run is its own process (`lotaqaf quantize ... quant.stream=true|false`); what is printed is the
quantize stage's peak resident set (VmHWM, reset when the stage starts); the growth per added layer
is the memory that depends on depth.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

DRIVER = """
import json, sys
from lotaqaf_cli.cli import main
rc = main(sys.argv[1:])
# VmHWM, not ru_maxrss: the latter keeps the launching process's resident set from before exec
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"rc": rc, "peak_mb": hwm / 1024}))
"""


def quantize_peak(model_dir: Path, text: Path, work: Path, stream: bool, extra=()) -> dict:
    """Run `lotaqaf quantize` on ``model_dir`` in a fresh process; its exit code, peak RSS and seconds."""
    args = ["quantize", "recipe=smoke", f"model.path={model_dir}", "calib=file", f"calib.path={text}",
            "calib.n_samples=8", "calib.seq_len=64", "quant.batch_size=4", f"quant.stream={str(stream).lower()}",
            f"run.root={work}", "device=cpu", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOTAQAF_QUIET": "1"}
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", DRIVER, *args], capture_output=True, text=True, env=env, cwd=work)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return {**res, "seconds": round(time.time() - t0, 1)}


def llama8b(args) -> None:
    """Streamed quantization of a random model of Llama-3.1-8B's layer shape: seconds per decoder layer
    and the stage's peak memory (GPU: torch.cuda.max_memory_reserved), into OUT/stream.json and stream.md."""
    from tiny_models import corpus, random_model_dir

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = (dict(hidden=128, intermediate=384, heads=4, kv_heads=2, head_dim=32) if args.dry_run else
             dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128))
    n_samples, seq_len = (4, 64) if args.dry_run else (128, 2048)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text = tmp / "text.txt"
        text.write_text("\n".join(corpus(20000)) + "\n")
        d = random_model_dir(tmp / "m", args.llama8b, shard_mb=2000, dtype="bfloat16", **shape)
        device = "cpu" if args.dry_run else "cuda"
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "lotaqaf_cli", "quantize", "recipe=smoke", f"model.path={d}",
                            "model.dtype=bfloat16", "quant.stream=true", f"device={device}", "calib=file",
                            f"calib.path={text}", f"calib.n_samples={n_samples}", f"calib.seq_len={seq_len}",
                            "quant.batch_size=8", "quant.group_size=64", f"run.root={tmp / 'runs'}",
                            f"run.dir={tmp / 'runs/run'}"], capture_output=True, text=True,
                           env={**os.environ, "LOTAQAF_QUIET": "1"})
        if r.returncode != 0:
            raise SystemExit(r.stderr[-3000:])
        rec = json.loads((tmp / "runs/run/quantize.json").read_text())
        mem = json.loads((tmp / "runs/run/memory.json").read_text())
    res = {"layers": args.llama8b, "shape": shape, "calibration": f"{n_samples} x {seq_len}", "device": device,
           "seconds_per_layer": round(rec["timings"]["quantize_s"] / args.llama8b, 2),
           "peak_gb": mem["peak_gb"]["quantize"], "measured": mem["measured"],
           "wall_s": round(time.time() - t0, 1)}
    (out / "stream.json").write_text(json.dumps(res, indent=2) + "\n")
    md = (f"| streamed GPTQ 4-bit g64, Llama-3.1-8B layer shape (random bf16 weights, {args.llama8b} layers, "
          f"calibration {n_samples} x {seq_len}) | {res['seconds_per_layer']} s per layer | peak "
          f"{res['peak_gb']} GB ({mem['measured']}) |\n")
    (out / "stream.md").write_text(md)
    print(md, end="")


def main() -> None:
    from tiny_models import corpus, random_model_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs=2, default=[2, 10])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--llama8b", type=int, default=0, help="layers of Llama-3.1-8B's shape, streamed (GPU)")
    ap.add_argument("--dry-run", action="store_true", help="with --llama8b: a tiny shape on CPU")
    ap.add_argument("--out", default="gpu_out")
    args = ap.parse_args()
    if args.llama8b:
        return llama8b(args)
    layer_mb = (4 * args.hidden * args.hidden * 3 // 4 + 3 * args.hidden * args.intermediate) * 4 / 2**20
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text = tmp / "text.txt"
        text.write_text("\n".join(corpus(256)) + "\n")
        for n in args.layers:
            d = random_model_dir(tmp / f"m{n}", n, args.hidden, args.intermediate)
            size = sum(f.stat().st_size for f in d.glob("*.safetensors")) / 2**20
            for stream in (True, False):
                r = quantize_peak(d, text, tmp / f"w{n}{stream}", stream)
                rows.append({"layers": n, "model_mb": round(size), "stream": stream, **r})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\none decoder layer: {layer_mb:.0f} MB fp32")
    print("| layers | model MB (fp32) | path | peak RSS MB | seconds |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['model_mb']} | {'streamed' if r['stream'] else 'in memory'} | "
              f"{r['peak_mb']:.0f} | {r['seconds']} |")
    lo, hi = args.layers
    for stream in (True, False):
        a, b = (next(r for r in rows if r["layers"] == n and r["stream"] == stream) for n in (lo, hi))
        per = (b["peak_mb"] - a["peak_mb"]) / (hi - lo)
        print(f"{'streamed' if stream else 'in memory'}: peak grows {per:.1f} MB per added layer "
              f"({per / layer_mb:.2f} x a layer's fp32 size)")


if __name__ == "__main__":
    main()
