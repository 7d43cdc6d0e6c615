#!/usr/bin/env bash
# lotaqaf's prepared GPU check: one command on a machine with one CUDA GPU, python3 with torch, triton and
# transformers, and no network. It installs the few wheels that machine lacks from .whl/ (made here by
# `make gpu-wheels`), runs the CUDA tests and scripts/bench_gpu.py, and leaves gpu.json and gpu.md in OUT.
#
#   make gpu-wheels                                  # here, once: the wheels into .whl/ (git-ignored)
#   bash scripts/gpu_check.sh [OUT]                  # there, from the repository root (OUT default: gpu_out)
#   bash scripts/gpu_check.sh --dry-run [OUT]        # any machine: the same steps on CPU with a tiny model
#   bash scripts/gpu_check.sh --download-wheels      # what `make gpu-wheels` runs
#
# Budget: under 9 minutes on an H200 (the CUDA tests about 1-2 min, bench_gpu.py a few minutes, the streamed
# 8B-shape quantization about a minute, the torchrun check seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# What the GPU image lacks that `lotaqaf train` imports (pure-Python wheels; omegaconf needs antlr4 4.9.*),
# at the versions of the lock (constraints.txt).
GPU_WHEELS=$(grep -iE '^(hydra-core|omegaconf|antlr4-python3-runtime)==' constraints.txt | tr '\n' ' ')

if [ "${1:-}" = "--download-wheels" ]; then
  mkdir -p .whl
  # pip wheel takes a published wheel as it is and builds one from an sdist (antlr4 4.9.3 has only that)
  $PY -m pip wheel -q --no-deps -w .whl $GPU_WHEELS
  ls -l .whl
  exit 0
fi

dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
OUT=${1:-gpu_out}
mkdir -p "$OUT"
site=$(mktemp -d)

# 1. the missing wheels (none needed where they are installed already, as on a developer's machine)
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site/pkgs" .whl/*.whl
  export PYTHONPATH="$site/pkgs${PYTHONPATH:+:$PYTHONPATH}"
fi
# 2. the checkout importable as it is: lotaqaf_cli from the root, lotaqaf_kernels from kernels/
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import torch, lotaqaf_cli.commands, lotaqaf_kernels; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(), '| kernels mode', lotaqaf_kernels.mode(), '| triton', lotaqaf_kernels.triton_available())"

# 3. kernels vs the torch path on CUDA, the certificate 0.0 through the chain on CUDA, a CUDA train-resume
if [ $dry = 1 ]; then
  $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py || [ $? = 5 ]   # no CUDA: all skipped
else
  $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log"
fi

# 4. the figures
if [ $dry = 1 ]; then
  $PY scripts/bench_gpu.py --dry-run --out "$OUT"
else
  $PY scripts/bench_gpu.py --out "$OUT"
fi
# 5. streamed quantization of Llama-3.1-8B's layer shape (seconds per layer, peak GPU memory): OUT/stream.md
if [ $dry = 1 ]; then
  $PY scripts/bench_stream.py --llama8b 2 --dry-run --out "$OUT"
else
  $PY scripts/bench_stream.py --llama8b 4 --out "$OUT"
fi

# 6. torch.distributed: one rank through torchrun (NCCL on the GPU, gloo in the dry run), train on the smoke model
dev=cuda; [ $dry = 1 ] && dev=cpu
OMP_NUM_THREADS=1 LOTAQAF_QUIET=1 $PY -m torch.distributed.run --nproc_per_node=1 --master_port=29531 \
  -m lotaqaf_cli train recipe=smoke "stages=[quantize,train]" device=$dev optim.steps=2 \
  run.root="$OUT/dist" run.dir="$OUT/dist/run" > "$OUT/dist.log" 2>&1
$PY -c "import json,sys; t=json.load(open('$OUT/dist/run/train.json')); print('| torchrun, 1 rank ($dev) | train ok, ranks', t['ranks'], '|')" | tee "$OUT/dist.md"
cat "$OUT/stream.md" "$OUT/dist.md" >> "$OUT/gpu.md"
echo "gpu_check: done; $OUT/gpu.md is the table for docs/results/gpu.md"
