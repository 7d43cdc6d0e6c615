"""Recipe composition (Hydra's compose API over recipes/) for every command, and the one
validation of what users set."""

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
STAGES = ("quantize", "train", "ppl", "merge", "eval")   # what `lotaqaf train` may chain
EVAL_TASKS = ("mmlu", "ppl", "gsm8k")
EXPORT_FORMATS = ("gptq", "gguf", "hf16")


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
    """Compose config.yaml + recipe + overrides (every command); unknown keys are errors naming the
    nearest keys."""
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
            return hydra_compose(config_name="config", overrides=overrides)
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


def validate(cfg: DictConfig, command: str = "train") -> None:
    """Every check on values a user can set, in one place, before any work; each failure is one line."""
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
    bad = [s for s in cfg.stages if s not in STAGES]
    if bad:
        raise LotaqafError(f"unknown stage(s) {bad}; known: {sorted(STAGES)}")
    _validate_adapter(cfg.adapter, cfg.optim)
    _validate_eval(cfg.eval)
    e = cfg.export
    if e.format is not None and e.format not in EXPORT_FORMATS:
        raise LotaqafError(f"unknown export format '{e.format}'; valid: {', '.join(EXPORT_FORMATS)}")
    if command == "export" and e.format is None:
        raise LotaqafError(f"export needs --format (export.format): {' | '.join(EXPORT_FORMATS)}")


def _validate_adapter(a: DictConfig, o: DictConfig) -> None:
    from .core.ternary import check_hparams
    from .io.adapter import KINDS

    if a.kind not in KINDS:
        raise LotaqafError(f"unknown adapter '{a.kind}'; valid: {', '.join(KINDS)}")
    if o.name not in ("tsignsgd", "adamw"):
        raise LotaqafError(f"unknown optimizer '{o.name}'; valid: tsignsgd, adamw")
    if a.kind == "lota":
        try:
            check_hparams(a.rank, a.omega, a.offset_granularity)
        except ValueError as e:
            raise LotaqafError(f"adapter: {e}") from None
        if o.name != "tsignsgd":
            raise LotaqafError("adapter=lota trains with optim=tsignsgd (ternary weights have no learning rate)")
    else:
        if a.rank < 1:
            raise LotaqafError(f"adapter.rank must be >= 1, got {a.rank}")
        if o.name != "adamw":
            raise LotaqafError(f"adapter={a.kind} trains with optim=adamw")
    if o.steps < 1 or o.batch_size < 1 or o.grad_accum < 1:
        raise LotaqafError("optim.steps, optim.batch_size and optim.grad_accum must be >= 1")


def _validate_eval(ev: DictConfig) -> None:
    from .eval.mmlu import check_mmlu_args

    tasks = list(ev.tasks)
    bad = [t for t in tasks if t not in EVAL_TASKS]
    if bad or not tasks:
        raise LotaqafError(f"unknown task '{bad[0] if bad else tasks}'; valid: {', '.join(EVAL_TASKS)}")
    check_mmlu_args(ev.engine, ev.limit, ev.num_fewshot, ev.batch_size)
    if ev.mmlu_source not in ("auto", "hub", "offline"):
        raise LotaqafError(f"eval.mmlu_source must be auto, hub or offline, got {ev.mmlu_source}")
    if ev.gsm8k_file is not None and not Path(ev.gsm8k_file).is_file():
        raise LotaqafError(f"--gsm8k-file {ev.gsm8k_file}: no such file")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
