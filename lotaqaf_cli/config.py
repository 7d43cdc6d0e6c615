"""Recipe composition (Hydra's compose API over recipes/) for every command, and the one
validation of what users set: a schema of every key, the rules that join keys, the paths."""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import lotaqaf_kernels as kernels
from omegaconf import DictConfig, ListConfig, OmegaConf

from .core.quant import SUPPORTED_BITS
from .errors import LotaqafError

GROUPS = ("model", "quant", "calib", "adapter", "optim", "data", "eval", "recipe")
DEFAULT_RECIPE = "smollm2_mmlu"
STAGES = ("quantize", "train", "ppl", "merge", "eval")   # what `lotaqaf train` may chain
EXPORT_FORMATS = ("gguf", "torchao", "gptq", "hf16")


def _shipped_file(name: str) -> str:
    """``${shipped:NAME}`` in a recipe: the path of a data file shipped in lotaqaf_cli/data/shipped/."""
    from .data.shipped import DIR

    if not (DIR / name).is_file():
        raise LotaqafError(f"no shipped data file '{name}' (have: {', '.join(sorted(p.name for p in DIR.iterdir()))})")
    return str(DIR / name)


OmegaConf.register_new_resolver("shipped", _shipped_file, replace=True)


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
                near = difflib.get_close_matches(key, [k for k, _ in _leaves(base)], n=3, cutoff=0.5)
                hint = f"; nearest valid keys: {', '.join(near)}" if near else ""
                raise LotaqafError(f"unknown config key '{key}'{hint}") from None
            raise LotaqafError(f"bad override: {msg.splitlines()[0]}") from None


# ---------------------------------------------------------------------------------------------
# the schema: every key of the composed config, its type and what values it allows
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """What one config key allows: a type (int | float | bool | str | list), a range or a set of
    choices, and whether null is allowed: :meth:`allows` a value, :meth:`describe` what it allows."""

    type: str
    choices: tuple = ()
    low: float | None = None         # inclusive lower bound (exclusive when low_open)
    low_open: bool = False
    high: float | None = None        # exclusive upper bound (inclusive when high_closed)
    high_closed: bool = False
    also: tuple = ()                 # extra allowed values outside the range (group_size -1)
    nullable: bool = False
    item: Rule | None = None         # list items
    nonempty: bool = False           # lists
    alt: Rule | None = None          # an alternative rule (schedule: a name or a keep fraction)

    def describe(self) -> str:
        if self.choices:
            out = "one of " + ", ".join(map(str, self.choices))
        elif self.type == "list":
            out = f"a {'non-empty ' if self.nonempty else ''}list of " + (
                self.item.describe() if self.item else "values")
        else:
            out = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}[self.type]
            if self.low is not None and self.high is not None:
                out += f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{']' if self.high_closed else ')'}"
            elif self.low is not None:
                out += f" {'>' if self.low_open else '>='} {self.low:g}"
            if self.also:
                out += " or " + ", ".join(map(str, self.also))
        if self.alt is not None:
            out += ", or " + self.alt.describe()
        return out + (", or null" if self.nullable else "")

    def allows(self, value) -> bool:
        if value is None:
            return self.nullable
        if self.alt is not None and self.alt.allows(value):
            return True
        if value in self.also and not isinstance(value, bool):
            return True
        if self.type == "bool":
            return isinstance(value, bool)
        if self.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            return False
        if self.type == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return False
        if self.type == "str" and not isinstance(value, str):
            return False
        if self.type == "list":
            if not isinstance(value, (list, tuple, ListConfig)) or (self.nonempty and not value):
                return False
            return self.item is None or all(self.item.allows(v) for v in value)
        if self.choices:
            return value in self.choices
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value > self.high if self.high_closed else value >= self.high):
            return False
        return True


def Int(low=None, high=None, **kw) -> Rule:
    return Rule("int", low=low, high=high, **kw)


def Float(low=None, high=None, **kw) -> Rule:
    return Rule("float", low=low, high=high, **kw)


def Choice(*choices, **kw) -> Rule:
    return Rule("str" if all(isinstance(c, str) for c in choices) else "int", choices=tuple(choices), **kw)


BOOL, STR, PATH = Rule("bool"), Rule("str"), Rule("str", nullable=True)
TEXT_SOURCES = ("self", "shipped", "file", "c4")
DTYPES = ("float32", "float16", "bfloat16")


def schema() -> dict[str, Rule]:
    """The rule of every key a composed config may hold (keys of one adapter or optimizer kind only
    appear with it). A key missing here is an unknown key."""
    from .core.offset_pooling import GRANULARITIES
    from .core.quant_params import TRAINABLE
    from .core.tsignsgd import SCHEDULES
    from .data.mmlu import FEWSHOT_ROWS
    from .data.sft import SOURCES as DATA_SOURCES
    from .eval.mmlu import MMLU_ENGINES
    from .io.adapter import KINDS
    from .io.gguf_export import GGUF_TYPES
    from .precision import PRECISIONS

    text = {"source": Choice(*TEXT_SOURCES), "path": PATH, "n_samples": Int(1), "seq_len": Int(8),
            "seed": Int(0)}
    return {
        "name": STR, "description": STR, "seed": Int(0), "device": Choice("auto", "cpu", "cuda"), "resume": BOOL,
        "kernels": Choice(*kernels.MODES), "precision": Choice(*PRECISIONS),
        "stages": Rule("list", item=Choice(*STAGES), nonempty=True),
        "run.root": STR, "run.dir": PATH,
        "model.path": STR, "model.dtype": Choice(*DTYPES),
        "model.target_modules": Rule("list", item=STR, nonempty=True),
        "quant.method": Choice("gptq", "rtn", "nf4"), "quant.bits": Choice(*SUPPORTED_BITS),
        "quant.group_size": Int(1, also=(-1,)), "quant.act_order": BOOL, "quant.act_group_aware": BOOL,
        "quant.static_groups": BOOL,
        "quant.true_sequential": BOOL, "quant.damp_percent": Float(0, 1), "quant.block_size": Int(1),
        "quant.mse": Choice("auto", alt=Float(0)),
        "quant.batch_size": Int(1), "quant.stream": Choice("auto", alt=BOOL),
        "quant.activations": Choice("auto", "device", "host"),
        "plan.device_gb": Float(0, low_open=True, nullable=True), "plan.check": BOOL,
        **{f"calib.{k}": r for k, r in text.items()},
        **{f"ppl.{k}": r for k, r in text.items()}, "ppl.batch_size": Int(1),
        "adapter.kind": Choice(*KINDS), "adapter.rank": Int(1), "adapter.omega": Float(0, low_open=True),
        "adapter.offset_granularity": Choice(*GRANULARITIES), "adapter.markers": BOOL, "adapter.alpha": Float(0, low_open=True),
        "adapter.dropout": Float(0, 1), "adapter.train": Rule("list", item=Choice(*TRAINABLE), nonempty=True),
        "optim.name": Choice("tsignsgd", "adamw"), "optim.steps": Int(1), "optim.batch_size": Int(1),
        "optim.grad_accum": Int(1), "optim.save_every": Int(1), "optim.gradient_checkpointing": BOOL,
        "optim.schedule": Choice(*SCHEDULES, alt=Float(0, 1, low_open=True, high_closed=True)),
        "optim.tau": Float(0, low_open=True),
        "optim.lr": Float(0, low_open=True), "optim.weight_decay": Float(0), "optim.warmup_ratio": Float(0, 1, high_closed=True),
        "optim.max_grad_norm": Float(0, nullable=True),
        "data.source": Choice(*DATA_SOURCES), "data.path": PATH, "data.n_samples": Int(1, nullable=True),
        "data.source_len": Int(0), "data.target_len": Int(1), "data.seed": Int(0),
        "eval.tasks": Rule("list", item=STR, nonempty=True), "eval.model": PATH,
        "eval.mmlu_source": Choice("auto", "hub", "offline"), "eval.num_fewshot": Int(0, FEWSHOT_ROWS, high_closed=True),
        "eval.limit": Int(1, nullable=True), "eval.engine": Choice(*MMLU_ENGINES), "eval.batch_size": Int(1),
        "eval.gsm8k_file": PATH, "eval.sql_file": PATH, "eval.viggo_file": PATH, "eval.max_length": Int(2),
        "eval.lm_eval_include": PATH,
        "merge.verify": BOOL, "merge.unmerge": BOOL,
        "export.format": Choice(*EXPORT_FORMATS, nullable=True), "export.allow_lossy": BOOL,
        "export.offset_branch": BOOL, "export.source": Choice("merged", "adapter"), "export.gguf_type": Choice(*GGUF_TYPES), "export.check": BOOL, "export.check_python": PATH,
    }


def _leaves(cfg: DictConfig, prefix: str = ""):
    """(dotted key, value) of every leaf, MISSING for a `???` value."""
    for k in cfg:
        full = f"{prefix}{k}"
        if OmegaConf.is_missing(cfg, k):
            yield full, MISSING
            continue
        v = cfg[k]
        if isinstance(v, DictConfig):
            yield from _leaves(v, full + ".")
        else:
            yield full, OmegaConf.to_container(v) if isinstance(v, ListConfig) else v


MISSING = object()
MUST_SET = {"calib.path": "calib=file needs calib.path=FILE", "data.path": "data=jsonl needs data.path=FILE",
            "name": "a recipe sets it"}


def validate(cfg: DictConfig, command: str = "train") -> None:
    """The one validation of the composed config, before any work; each failure is one line naming
    the key, the value and what is allowed. First every key against :func:`schema` (type, range,
    choices), then the rules that join keys, then the paths the command will read or write."""
    rules = schema()
    for key, value in _leaves(cfg):
        if value is MISSING:
            raise LotaqafError(f"{key} must be set ({MUST_SET.get(key, f'give {key}=VALUE')})")
        rule = rules.get(key)
        if rule is None:
            near = difflib.get_close_matches(key, list(rules), n=3, cutoff=0.5)
            raise LotaqafError(f"unknown config key '{key}'" + (f"; nearest valid keys: {', '.join(near)}" if near
                                                                 else ""))
        if not rule.allows(value):
            raise LotaqafError(f"{key}={_show(value)} is not allowed: expected {rule.describe()}")
    _validate_joint(cfg, command)
    check_paths(cfg, command)


def _show(value) -> str:
    return repr(value) if isinstance(value, str) else str(value).replace("True", "true").replace("False", "false")


def _validate_joint(cfg: DictConfig, command: str) -> None:
    """Rules that join keys (the schema checks each key alone)."""
    from .core.ternary import check_hparams

    a, o = cfg.adapter, cfg.optim
    for sect in ("calib", "ppl"):
        if cfg[sect].source == "file" and not cfg[sect].path:
            raise LotaqafError(f"{sect}.source=file needs {sect}.path=FILE")
    if a.kind == "lota":
        try:
            check_hparams(a.rank, a.omega, a.offset_granularity)
        except ValueError as e:
            raise LotaqafError(f"adapter: {e}") from None
        if o.name != "tsignsgd":
            raise LotaqafError("adapter=lota trains with optim=tsignsgd (ternary weights have no learning rate)")
        if not a.markers and a.offset_granularity == "none":
            raise LotaqafError("adapter.markers=false with adapter.offset_granularity=none leaves the adapter no "
                               "effect: keep one of them")
    elif o.name != "adamw":
        raise LotaqafError(f"adapter={a.kind} trains with optim=adamw")
    if cfg.quant.method == "nf4" and a.kind != "lora":
        raise LotaqafError(f"adapter={a.kind} needs a GPTQ base (quant=gptq): quant=nf4 is QLoRA's base, trained "
                           "with adapter=lora")
    if cfg.quant.method == "nf4" and importlib.util.find_spec("bitsandbytes") is None:
        from .core.nf4 import MISSING

        raise LotaqafError(MISSING)
    if cfg.quant.method == "nf4" and cfg.quant.bits != 4:
        raise LotaqafError(f"quant=nf4 is 4-bit: quant.bits={cfg.quant.bits} is not allowed with it")
    if a.kind in ("scales", "zeros"):
        train = list(a.train)
        fits = train == ["scales"] if a.kind == "scales" else "zeros" in train
        if len(set(train)) != len(train) or not fits:
            raise LotaqafError(f"adapter.train={_show(train)} does not fit adapter={a.kind}: adapter=scales trains "
                               "[scales]; adapter=zeros trains [zeros] or [scales,zeros]")
    if command in ("train", "quantize"):
        _check_shipped(cfg, command)
    if cfg.data.source == "jsonl" and not cfg.data.path:
        raise LotaqafError("data=jsonl needs data.path=FILE")
    if command == "train" and "train" in cfg.stages and cfg.data.source == "sql" and not cfg.data.path:
        raise LotaqafError("data=sql needs data.path=FILE: the paper's SQL data is HALO's data/sql/train.jsonl "
                           "(IST-DASLab/HALO), which is not on the hub")
    if command == "eval" or (command == "train" and "eval" in cfg.stages):
        _check_eval_tasks(cfg.eval)
    if cfg.kernels == "triton" and not kernels.triton_available():
        raise LotaqafError("kernels=triton needs the triton package (pip install triton); kernels=auto runs without it")
    if cfg.kernels == "triton" and not kernels.interpreting():
        import torch

        if cfg.device == "cpu" or not torch.cuda.is_available():
            raise LotaqafError("kernels=triton needs a CUDA device (on CPU the Triton kernels run only under "
                               "TRITON_INTERPRET=1, for tests): use kernels=auto or kernels=torch here")
    if command == "export" and cfg.export.format is None:
        raise LotaqafError(f"export needs --format (export.format): {' | '.join(EXPORT_FORMATS)}")
    if command == "export" and cfg.export.source == "adapter" and cfg.export.format not in ("gptq", "hf16"):
        raise LotaqafError(f"export.source=adapter writes a LoRA-type run unmerged: --format gptq (its GPTQ base + "
                           f"the LoRA in PEFT) or, for a QLoRA run, --format hf16 (not {cfg.export.format})")
    if command == "export" and cfg.export.format == "gguf" and cfg.export.gguf_type != "q4_1" and not cfg.export.allow_lossy:
        from .io.gguf_export import lossy_gguf_refusal

        raise LotaqafError(lossy_gguf_refusal(cfg.export.gguf_type))


def _check_eval_tasks(ev: DictConfig) -> None:
    """Every task is lotaqaf's or lm-eval's, and lotaqaf's task-specific ones have their data."""
    from .data.tasks import TASKS
    from .eval import lm_eval_tasks
    from .hub import hub_reachable

    tasks = list(ev.tasks)
    if ev.lm_eval_include is not None and not Path(ev.lm_eval_include).expanduser().is_dir():
        raise LotaqafError(f"eval.lm_eval_include={ev.lm_eval_include}: not a directory of lm-eval task files")
    lm_eval_tasks.check(tasks, lm_eval_tasks.include_path(ev.lm_eval_include))
    if "sql" in tasks and ev.sql_file is None:
        raise LotaqafError("sql needs eval.sql_file=FILE (--sql-file): the paper's SQL test data is HALO's "
                           "data/sql/valid.jsonl (IST-DASLab/HALO), which is not on the hub")
    for t in TASKS.values():
        if t.name in tasks and t.hub and ev[f"{t.name}_file"] is None and not hub_reachable():
            raise LotaqafError(f"{t.name} needs the Hugging Face hub ({t.hub}), which is unreachable; offline, give a "
                               f"local copy in its layout with --{t.name}-file FILE.jsonl")


def _check_shipped(cfg: DictConfig, command: str) -> None:
    """Sections the chain will read from shipped data: the model must be one lotaqaf ships data for,
    and the request within what the file holds."""
    from .data import shipped

    stages = ["quantize"] if command == "quantize" else list(cfg.stages)
    used = {"calib": "quantize" in stages or "train" in stages, "heldout": "ppl" in stages or "merge" in stages,
            "train": "train" in stages}
    for role, section in (("calib", cfg.calib), ("heldout", cfg.ppl), ("train", cfg.data)):
        if used[role] and section.source == "shipped":
            shipped.check_section(cfg.model.path, role, section)


def check_paths(cfg: DictConfig, command: str) -> None:
    """The paths the command reads must be readable files and the places it writes creatable and
    writable, before any work (nothing is created by the check)."""
    if command in ("train", "quantize"):
        writable_dir(cfg.run.dir or cfg.run.root, "run.dir" if cfg.run.dir else "run.root")
        uses_data = command == "train" and "train" in cfg.stages
        reads = [("calib.path", cfg.calib.path if cfg.calib.source == "file" else None),
                 ("ppl.path", cfg.ppl.path if cfg.ppl.source == "file" and "ppl" in cfg.stages else None),
                 ("data.path", cfg.data.path if uses_data and cfg.data.source in ("jsonl", "sql", "viggo")
                  else None)]
        for key, path in reads:
            if path is not None:
                readable_file(path, key)
    evaluates = command == "eval" or (command == "train" and "eval" in cfg.stages)
    for key in ("gsm8k_file", "sql_file", "viggo_file"):
        if evaluates and cfg.eval[key] is not None:
            readable_file(cfg.eval[key], f"eval.{key}")
    if command == "export" and cfg.export.check and cfg.export.check_python is not None:
        readable_file(cfg.export.check_python, "export.check_python")
        if not os.access(Path(cfg.export.check_python).expanduser(), os.X_OK):
            raise LotaqafError(f"export.check_python={cfg.export.check_python}: not executable")


def readable_file(path: str, key: str) -> None:
    p = Path(path).expanduser()
    if not p.exists():
        raise LotaqafError(f"{key}={path}: no such file")
    if not p.is_file():
        raise LotaqafError(f"{key}={path}: not a file")
    if not os.access(p, os.R_OK):
        raise LotaqafError(f"{key}={path}: not readable (permission denied)")


def writable_dir(path: str, key: str) -> None:
    """``path`` is, or can be created as, a directory lotaqaf can write in; checked by creating and
    removing a probe directory in its nearest existing ancestor, so that nothing is left behind."""
    p = Path(path).expanduser().absolute()
    ancestor = p
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise LotaqafError(f"{key}={path}: cannot create it ({ancestor} is not a directory)")
    try:
        probe = tempfile.mkdtemp(prefix=".lotaqaf-probe-", dir=ancestor)
        os.rmdir(probe)
    except OSError as e:
        what = "write in it" if ancestor == p else f"create it in {ancestor}"
        raise LotaqafError(f"{key}={path}: cannot {what} ({e.strerror})") from None


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
