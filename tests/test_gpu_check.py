"""scripts/gpu_check.sh --dry-run: the GPU check's steps (imports from the checkout, the CUDA tests'
collection, every part of scripts/bench_gpu.py) run on CPU with a tiny model and write the table."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "LOTAQAF_QUIET": "1"}
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "gpu.json").read_text())
    assert res["gptq"]["seconds_per_layer"] > 0
    assert res["train"]["lota"]["step_s"] > 0 and res["train"]["lora"]["step_s"] > 0
    assert len(res["inference"]) == 3 and all(v["decode_tok_s"] > 0 for v in res["inference"].values())
    assert res["bandwidth"]["achieved_gb_s"] > 0
    table = (out / "gpu.md").read_text()
    for row in ("GPTQ 4-bit g64, seconds per decoder layer", "train step time LoTA-QAF / LoRA",
                "merged LoTA-QAF (kernels=auto: Triton on CUDA): decode tok/s", "achieved bandwidth"):
        assert row in table, row
