"""The one home of a run: the layout of ``runs/<recipe>/<timestamp>/``, the content-addressed cache
``runs/_cache/`` shared by runs, finding runs, and loading what a run holds.

No other module names a run file: stages get objects, and the command layer (runner.py) asks this
module for paths, records and models.

    <run>/config.yaml  versions.json  run.log         the resolved config, library versions, a log
          quantize.json  train.json  ppl.json          what each stage did (records)
          metrics.jsonl  checkpoints/step_NNNNNN/      training progress, resumable
          adapter.safetensors                          the trained adapter (io/adapter.py)
          merged/  merge_certificate.json              the merged checkpoint and its certificate
          unmerged/  unmerge.json                      `lotaqaf merge --unmerge`
          export-<format>/  export-<format>.json       `lotaqaf export`
          eval-<model>.json  eval-<model>.md           `lotaqaf eval`
          status.json                                  done | failed (skipped as "newest") | interrupted
    _cache/quantized/<key>/   _cache/text/<key>.safetensors   _cache/sft/<key>.json
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from .. import dist
from ..errors import LotaqafError
from .checkpoint import is_checkpoint, load_quantized
from .files import atomic_dir, atomic_file, write_json_atomic, write_text_atomic

CONFIG, VERSIONS, LOG = "config.yaml", "versions.json", "run.log"
ADAPTER, METRICS, CHECKPOINTS, TENSORBOARD = "adapter.safetensors", "metrics.jsonl", "checkpoints", "tensorboard"
MERGED, UNMERGED = "merged", "unmerged"
RECORDS = ("quantize", "train", "ppl", "merge_certificate", "unmerge", "status", "memory", "plan")  # <name>.json
# status.json: how the last `lotaqaf train|quantize` of the run ended: done | failed | interrupted.
# memory.json: the peak memory of each stage of the last `lotaqaf train|quantize` (what `lotaqaf plan` predicts).
# "Newest run" lookups skip failed runs; an interrupted one is resumable (resume=true).
EVALS = "evals"   # eval results of models outside any run (`lotaqaf eval --model PATH`)
NEEDS = {"merge": ADAPTER, "eval": CONFIG, "export": ADAPTER}  # what the newest run must hold, per command
# Keys that may differ between two invocations of the same run (resuming, re-running a stage, the
# sections of the other commands).
VOLATILE_KEYS = {"run", "stages", "device", "resume", "merge", "eval", "export"}
# Cache versions: bump when the output for the same inputs changes.
TEXT_VERSION = "selfgen-v1"
DATA_VERSION = "sft-v1"
QUANT_VERSION = "gptq-v1"


def versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("lotaqaf", "torch", "transformers", "hydra-core", "omegaconf", "safetensors", "gguf",
                "lm_eval", "datasets", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def cache_key(*parts) -> str:
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def config_diff(old: dict, new: dict) -> list[str]:
    def diff(a, b, prefix=""):
        if isinstance(a, dict) and isinstance(b, dict):
            return [k for key in sorted(set(a) | set(b)) for k in diff(a.get(key), b.get(key), f"{prefix}{key}.")]
        return [] if a == b else [prefix.rstrip(".")]

    return diff({k: v for k, v in old.items() if k not in VOLATILE_KEYS},
                {k: v for k, v in new.items() if k not in VOLATILE_KEYS})


# ---------------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------------

class Cache:
    """``<root>/_cache``: quantized bases, self-generated text windows and self-distilled records,
    each keyed by everything that determines it."""

    def __init__(self, root: str | Path):
        self.path = Path(root).absolute() / "_cache"  # records name cache entries by absolute path

    def _file(self, kind: str, key: str, suffix: str = "") -> Path:
        d = self.path / kind
        d.mkdir(parents=True, exist_ok=True)
        return d / f"{key}{suffix}"

    @staticmethod
    def text_key(source_hash: str, role: str, section) -> str:
        """Key of the self-generated windows of ``role`` (calib | heldout) for a calib/ppl section."""
        return cache_key(TEXT_VERSION, source_hash, role, section.n_samples, section.seq_len, section.seed)

    @staticmethod
    def sft_key(source_hash: str, data) -> str:
        return cache_key(DATA_VERSION, source_hash, data.n_samples, data.target_len, data.seed)

    @staticmethod
    def quantized_key(source_hash: str, calib_hash: str, settings: dict) -> str:
        return cache_key(QUANT_VERSION, source_hash, calib_hash, settings)

    def text_file(self, key: str) -> Path:
        return self._file("text", key, ".safetensors")

    def load_text(self, key: str) -> torch.Tensor | None:
        from safetensors.torch import load_file

        f = self.path / "text" / f"{key}.safetensors"
        return load_file(str(f))["input_ids"] if f.is_file() else None

    def stored_windows(self, section, role: str, model_path: str, source_hash: str, tokenizer) -> torch.Tensor | None:
        """The token windows [n, seq_len] that a text ``section`` (calib or ppl) names for ``role`` ("calib" or
        "heldout"), made without a model: self-generated ones from this cache (None when not there yet),
        shipped ones from the package, file and c4 ones cut again (same seed; they need the tokenizer)."""
        from ..data import shipped, textfile

        if section.source == "self":
            return self.load_text(Cache.text_key(source_hash, role, section))
        if section.source == "shipped":
            return shipped.windows(model_path, role, source_hash, section.n_samples, section.seq_len, section.seed)
        if tokenizer is None:
            raise LotaqafError(f"{role} text from {section.source} needs a model with a tokenizer")
        if section.source == "file":
            return textfile.file_windows(section.path, tokenizer, section.n_samples, section.seq_len, section.seed)
        return textfile.c4_windows(tokenizer, section.n_samples, section.seq_len, section.seed)

    def save_text(self, key: str, windows: torch.Tensor) -> Path:
        from safetensors.torch import save_file

        path = self.text_file(key)
        if dist.main():
            with atomic_file(path) as tmp:
                save_file({"input_ids": windows.contiguous()}, str(tmp))
        return path

    def sft_file(self, key: str) -> Path:
        return self._file("sft", key, ".json")

    def load_sft(self, key: str) -> list[dict] | None:
        f = self.path / "sft" / f"{key}.json"
        return json.loads(f.read_text()) if f.is_file() else None

    def save_sft(self, key: str, records: list[dict]) -> Path:
        path = self.sft_file(key)
        if dist.main():
            write_json_atomic(path, records)
        return path

    def quantized_dir(self, key: str) -> Path:
        return self._file("quantized", key)

    def load_quantized(self, key: str, dtype: torch.dtype = torch.float32):
        """(model, tokenizer, info) of a cached base (its non-quantized tensors in ``dtype``), None when
        absent; a corrupted entry is removed and reported as the exception's message (the caller
        quantizes again)."""
        d = self.quantized_dir(key)
        if not is_checkpoint(d):
            return None
        try:
            return load_quantized(d, dtype)
        except LotaqafError:
            shutil.rmtree(d, ignore_errors=True)
            raise


# ---------------------------------------------------------------------------------------------
# a run directory
# ---------------------------------------------------------------------------------------------

class RunDir:
    """A run's directory. Nothing is written until :meth:`ensure` (so bad input writes nothing)."""

    def __init__(self, path: str | Path, cfg: DictConfig | None = None):
        self.path = Path(path)
        self.cfg = cfg

    # -- creating ---------------------------------------------------------------------------------

    @classmethod
    def for_config(cls, cfg: DictConfig) -> RunDir:
        """The run directory of a `lotaqaf train|quantize` invocation: run.dir, else (resume=true) the
        newest run of the recipe, else a new runs/<name>/<timestamp>. An existing directory may only be
        reused by the same run (same config, apart from VOLATILE_KEYS)."""
        root = Path(cfg.run.root)
        path = None
        if cfg.run.dir:
            path = Path(cfg.run.dir)
        elif cfg.resume:
            previous = newest_run(root, CONFIG, recipe=cfg.name)
            path = previous.path if previous else None
        if path is None:
            path = root / cfg.name / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        run = cls(path, cfg)
        run._check_reusable()
        return run

    @classmethod
    def for_evals(cls) -> RunDir:
        """Where `lotaqaf eval` writes the results of a model given by path, outside any run: ./evals."""
        return cls(EVALS)

    def _check_reusable(self) -> None:
        p = self.path
        if not p.exists():
            return
        if not p.is_dir():
            raise LotaqafError(f"output path {p} exists and is not a directory")
        f = p / CONFIG
        if not f.is_file():
            if any(p.iterdir()):
                raise LotaqafError(f"output directory {p} is not empty and holds no lotaqaf run")
            return
        diff = config_diff(yaml.safe_load(f.read_text()) or {}, OmegaConf.to_container(self.cfg, resolve=True))
        if diff:
            raise LotaqafError(f"output directory {p} already holds a different run "
                               f"(differs in {', '.join(diff[:5])}); choose another run.dir")

    def ensure(self) -> Path:
        """Create the directory with its config.yaml and versions.json (once). Under torch.distributed
        only rank 0 writes a run's files (here and below); the other ranks' writes are no-ops."""
        if not dist.main():
            return self.path
        self.path.mkdir(parents=True, exist_ok=True)
        if self.cfg is not None and not (self.path / CONFIG).is_file():
            write_text_atomic(self.path / CONFIG, OmegaConf.to_yaml(self.cfg, resolve=True))
            write_json_atomic(self.path / VERSIONS, versions())
        return self.path

    # -- records and logs -------------------------------------------------------------------------

    def write_record(self, name: str, obj) -> Path:
        """<run>/<name>.json for a stage record (RECORDS), an export (export-<fmt>) or an eval (eval-<model>)."""
        if name not in RECORDS and not name.startswith(("export-", "eval-")):
            raise ValueError(f"not a record of a run: {name}")
        self.ensure()
        path = self.path / f"{name}.json"
        if dist.main():
            write_json_atomic(path, obj)
        return path

    def mark(self, state: str, **info) -> None:
        """Record how the run's last invocation ended (done | failed | interrupted), if it wrote anything."""
        if self.path.is_dir() and dist.main():
            write_json_atomic(self.path / "status.json", {"state": state, **info})

    def failed(self) -> bool:
        try:
            return (self.read_record("status") or {}).get("state") == "failed"
        except (OSError, ValueError):
            return False

    def read_record(self, name: str) -> dict | None:
        f = self.path / f"{name}.json"
        return json.loads(f.read_text()) if f.is_file() else None

    def write_text(self, name: str, text: str) -> Path:
        self.ensure()
        if dist.main():
            write_text_atomic(self.path / name, text)
        return self.path / name

    def log(self, line: str) -> None:
        if not dist.main():
            return
        self.ensure()
        stamp = _dt.datetime.now().isoformat(timespec="seconds")
        with open(self.path / LOG, "a") as f:
            f.write(f"{stamp} {line}\n")

    # -- artifact paths ---------------------------------------------------------------------------

    @property
    def adapter_file(self) -> Path:
        return self.path / ADAPTER

    @property
    def merged_dir(self) -> Path:
        return self.path / MERGED

    @property
    def unmerged_dir(self) -> Path:
        return self.path / UNMERGED

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD

    def export_dir(self, fmt: str) -> Path:
        return self.path / f"export-{fmt}"

    def has_merged(self) -> bool:
        return is_checkpoint(self.merged_dir) and (self.path / "merge_certificate.json").is_file()

    # -- training state (the train stage's store) -------------------------------------------------

    def save_checkpoint(self, step: int, state: dict) -> None:
        """A training checkpoint, atomically; the newest two are kept."""
        if not dist.main():
            return
        final = self.ensure() / CHECKPOINTS / f"step_{step:06d}"
        with atomic_dir(final) as tmp:
            torch.save(state, tmp / "state.pt")
        for old in sorted((self.path / CHECKPOINTS).glob("step_*"))[:-2]:
            shutil.rmtree(old, ignore_errors=True)

    def newest_checkpoint(self) -> tuple[Path, dict] | None:
        done = sorted(p for p in (self.path / CHECKPOINTS).glob("step_*") if (p / "state.pt").is_file())
        return (done[-1], torch.load(done[-1] / "state.pt", weights_only=False)) if done else None

    def open_metrics(self, keep_steps: int):
        """metrics.jsonl for appending, after dropping rows past ``keep_steps`` (redone on resume)."""
        if not dist.main():
            return open(os.devnull, "a")
        path = self.ensure() / METRICS
        if path.exists():
            rows = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= keep_steps]
            write_text_atomic(path, "".join(r + "\n" for r in rows))
        return open(path, "a")

    # -- what a run holds -------------------------------------------------------------------------

    def config(self) -> DictConfig:
        f = self.path / CONFIG
        if not f.is_file():
            raise LotaqafError(f"{self.path} is not a lotaqaf run (no {CONFIG})")
        return OmegaConf.load(f)

    def base_dir(self) -> Path:
        rec = self.read_record("quantize")
        if rec is None:
            raise LotaqafError(f"run {self.path} has no quantize.json: it is not a complete lotaqaf run")
        base = Path(rec["checkpoint"])
        if not base.is_dir():
            raise LotaqafError(f"the quantized base {base} of run {self.path} is gone (re-run `lotaqaf quantize`)")
        return base

    def source_hash(self, base_info: dict | None = None) -> str | None:
        """The source model's hash, which keys the run's self-generated text."""
        rec = self.read_record("quantize") or {}
        return rec.get("source_hash") or (base_info or {}).get("provenance", {}).get("source_hash")

    def load_base(self, dtype: torch.dtype = torch.float32):
        """(model, tokenizer, info) of the run's quantized base (non-quantized tensors in ``dtype``). An NF4
        base (quant=nf4) is not cached: it is made again from the source, which gives the same base."""
        cfg = self.config()
        if cfg.quant.method == "nf4":
            from .. import precision
            from ..core.nf4 import nf4_base_info, quantize_model_nf4
            from .models import load_model

            src = load_model(cfg.model.path, cfg.model.dtype)
            quantize_model_nf4(src.model, list(cfg.model.target_modules), dtype, blocksize=cfg.quant.group_size)
            return precision.cast_(src.model, dtype), src.tokenizer, nf4_base_info(src.source_hash, cfg.quant.group_size)
        return load_quantized(self.base_dir(), dtype)

    def load_adapted(self, dtype: torch.dtype = torch.float32):
        """(adapted model, tokenizer, adapter header, base info): the base with the run's adapter."""
        from .adapter import load_adapter

        if not self.adapter_file.is_file():
            raise LotaqafError(f"run {self.path} has no {ADAPTER}: nothing to merge (train it first)")
        model, tok, info = self.load_base(dtype)
        meta = load_adapter(model, self.adapter_file, info["content_hash"])
        return model.eval(), tok, meta, info

    def load_merged(self, dtype: torch.dtype = torch.float32):
        if not is_checkpoint(self.merged_dir):
            raise LotaqafError(f"run {self.path} has no merged model: run `lotaqaf merge run={self.path}` first")
        return load_quantized(self.merged_dir, dtype)

    def heldout_windows(self, base_info: dict | None = None, tokenizer=None) -> torch.Tensor | None:
        """The run's held-out perplexity windows, as its config names them (Cache.stored_windows); None
        when they cannot be had without the model (self-generated text not in the cache, a file without
        the tokenizer) or the network (c4)."""
        cfg = self.config()
        source = cfg.ppl.source
        src = None if source == "file" else self.source_hash(base_info)   # file windows need no hash
        if source == "c4" or (source == "file" and tokenizer is None) or (source != "file" and src is None):
            return None
        return Cache(cfg.run.root).stored_windows(cfg.ppl, "heldout", cfg.model.path, src, tokenizer)


def newest_run(root: str | Path, marker: str = CONFIG, recipe: str = "*") -> RunDir | None:
    """The most recently written run under ``root`` (of ``recipe``, default any) that holds ``marker``
    and did not fail (None: none)."""
    runs = sorted((f for f in Path(root).glob(f"{recipe}/*/{marker}") if not RunDir(f.parent).failed()),
                  key=lambda f: f.stat().st_mtime)
    return RunDir(runs[-1].parent) if runs else None


def find_run(run_dir: str | None, root: str | Path = "runs", marker: str = ADAPTER) -> RunDir:
    """``run_dir`` when given (it must exist), else the newest run under ``root`` holding ``marker``."""
    if run_dir:
        if not Path(run_dir).is_dir():
            raise LotaqafError(f"run directory does not exist: {run_dir}")
        return RunDir(run_dir)
    found = newest_run(root, marker)
    if found is None:
        what = "a trained adapter" if marker == ADAPTER else "a lotaqaf run"
        raise LotaqafError(f"no run with {what} under {root}/ (run `lotaqaf train` first, or give run=DIR)")
    return found
