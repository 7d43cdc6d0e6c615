"""Recipe composition (Hydra's compose API over recipes/) and validation of what users set."""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .core.quant import SUPPORTED_BITS
from .errors import LotaqafError

GROUPS = ("model", "quant", "calib", "adapter", "optim", "data", "eval", "recipe")
DEFAULT_RECIPE = "smollm2_mmlu"


def recipes_dir() -> Path:
    env = os.environ.get("LOTAQAF_RECIPES")
    d = Path(env) if env else Path(__file__).resolve().parent.parent / "recipes"
    if not (d / "config.yaml").is_file():
        raise LotaqafError(f"recipes directory not found at {d} (set LOTAQAF_RECIPES)")
    return d


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (recipes_dir() / group).glob("*.yaml"))


def list_recipes() -> list[tuple[str, str]]:
    """(name, one-line description) of every preset in recipes/recipe/."""
    out = []
    for name in group_options("recipe"):
        text = (recipes_dir() / "recipe" / f"{name}.yaml").read_text()
        m = re.search(r"^description:\s*\"?(.*?)\"?\s*$", text, re.M)
        out.append((name, m.group(1) if m else ""))
    return out


def _flat_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, DictConfig):
            keys.extend(_flat_keys(v, full + "."))
    return keys


def _check_group_choices(overrides: list[str]) -> None:
    for ov in overrides:
        key, _, value = ov.partition("=")
        key = key.lstrip("+~")
        if key in GROUPS:
            options = group_options(key)
            if value not in options:
                what = "recipe" if key == "recipe" else f"option for {key}"
                raise LotaqafError(f"unknown {what} '{value}'; valid: {', '.join(options)}")


def compose(overrides: list[str]) -> DictConfig:
    """Compose config.yaml + recipe + overrides; unknown keys are errors naming the nearest keys."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    for ov in overrides:
        if "=" not in ov:
            raise LotaqafError(f"expected key=value, got '{ov}'")
    _check_group_choices(overrides)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(recipes_dir()), version_base=None):
        try:
            cfg = hydra_compose(config_name="config", overrides=overrides)
        except (HydraException, OmegaConfBaseException) as e:
            msg = str(e)
            m = re.search(r"Could not override '([^']+)'", msg) or re.search(r"Key '([^']+)' is not in struct", msg)
            if m:
                key = m.group(1)
                groups = [o for o in overrides if o.split("=", 1)[0] in GROUPS]
                base = hydra_compose(config_name="config", overrides=groups)
                near = difflib.get_close_matches(key, _flat_keys(base), n=3, cutoff=0.5)
                hint = f"; nearest valid keys: {', '.join(near)}" if near else ""
                raise LotaqafError(f"unknown config key '{key}'{hint}") from None
            raise LotaqafError(f"bad override: {msg.splitlines()[0]}") from None
    if cfg.adapter.name in ("lora", "qalora") and cfg.optim.name == "tsignsgd" and \
            not any(o.split("=", 1)[0].lstrip("+~") == "optim" for o in overrides):
        # The baselines train with AdamW: `adapter=lora` alone selects it (optim=... still decides).
        return compose([*overrides, "optim=adamw"])
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Checks on values a user can set; each failure is one line."""
    q = cfg.quant
    if q.bits not in SUPPORTED_BITS:
        raise LotaqafError(f"quant.bits must be one of {list(SUPPORTED_BITS)}, got {q.bits}")
    if not (q.group_size == -1 or (isinstance(q.group_size, int) and q.group_size > 0)):
        raise LotaqafError(f"quant.group_size must be a positive integer or -1, got {q.group_size}")
    if q.method not in ("gptq", "rtn"):
        raise LotaqafError(f"quant.method must be gptq or rtn, got {q.method}")
    if not 0 <= q.damp_percent < 1:
        raise LotaqafError(f"quant.damp_percent must be in [0, 1), got {q.damp_percent}")
    for sect in ("calib", "ppl"):
        c = cfg[sect]
        if c.n_samples < 1 or c.seq_len < 8:
            raise LotaqafError(f"{sect}.n_samples must be >= 1 and {sect}.seq_len >= 8")
        if c.source not in ("self", "file", "c4"):
            raise LotaqafError(f"{sect}.source must be self, file or c4, got {c.source}")
        if c.source == "file" and not c.path:
            raise LotaqafError(f"{sect}.source=file needs {sect}.path")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise LotaqafError(f"device must be auto, cpu or cuda, got {cfg.device}")
    known = {"quantize", "train", "ppl", "merge", "eval", "export"}
    bad = [s for s in cfg.stages if s not in known]
    if bad:
        raise LotaqafError(f"unknown stage(s) {bad}; known: {sorted(known)}")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
