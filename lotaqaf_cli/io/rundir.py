"""Run directories: runs/<recipe>/<timestamp>/ with the resolved config, versions, log and every
stage's outputs; plus runs/_cache/, a content-addressed cache shared by runs (quantized bases,
self-generated text)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import platform
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from ..errors import LotaqafError
from .checkpoint import write_json_atomic

CONFIG_FILE = "config.yaml"
# Keys that may differ between two invocations of the same run (resuming, re-running a stage).
VOLATILE_KEYS = {"run", "stages", "device", "resume"}


def versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("lotaqaf", "torch", "transformers", "hydra-core", "omegaconf", "safetensors", "gguf",
                "lm_eval", "datasets", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _comparable(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in VOLATILE_KEYS}


def _diff_keys(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def config_diff(old: dict, new: dict) -> list[str]:
    return _diff_keys(_comparable(old), _comparable(new))


class RunDir:
    """A run's directory. Nothing is written until :meth:`ensure` (so bad input writes nothing)."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.root = Path(cfg.run.root)
        previous = sorted(p for p in (self.root / cfg.name).glob("*") if (p / CONFIG_FILE).is_file()) \
            if cfg.resume and not cfg.run.dir else []
        if cfg.run.dir:
            self.path = Path(cfg.run.dir)
        elif previous:
            self.path = previous[-1]  # resume=true: the newest run of this recipe
        else:
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            self.path = self.root / cfg.name / stamp
        self.cache = self.root / "_cache"
        self._ready = False
        self.check_reusable()

    def check_reusable(self) -> None:
        """An existing directory may only be reused by the same run (same config)."""
        p = self.path
        if not p.exists():
            return
        if not p.is_dir():
            raise LotaqafError(f"output path {p} exists and is not a directory")
        f = p / CONFIG_FILE
        if not f.is_file():
            if any(p.iterdir()):
                raise LotaqafError(f"output directory {p} is not empty and holds no lotaqaf run")
            return
        old = yaml.safe_load(f.read_text()) or {}
        new = OmegaConf.to_container(self.cfg, resolve=True)
        diff = config_diff(old, new)
        if diff:
            raise LotaqafError(f"output directory {p} already holds a different run "
                               f"(differs in {', '.join(diff[:5])}); choose another run.dir")

    def ensure(self) -> Path:
        if not self._ready:
            self.path.mkdir(parents=True, exist_ok=True)
            text = OmegaConf.to_yaml(self.cfg, resolve=True)
            tmp = self.path / f".{CONFIG_FILE}.tmp"
            tmp.write_text(text)
            tmp.replace(self.path / CONFIG_FILE)
            write_json_atomic(self.path / "versions.json", versions())
            self._ready = True
        return self.path

    def write_json(self, name: str, obj) -> Path:
        self.ensure()
        write_json_atomic(self.path / name, obj)
        return self.path / name

    def log(self, line: str) -> None:
        self.ensure()
        stamp = _dt.datetime.now().isoformat(timespec="seconds")
        with open(self.path / "run.log", "a") as f:
            f.write(f"{stamp} {line}\n")

    def cache_path(self, kind: str, key: str, suffix: str = "") -> Path:
        d = self.cache / kind
        d.mkdir(parents=True, exist_ok=True)
        return d / f"{key}{suffix}"


def cache_key(*parts) -> str:
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]
