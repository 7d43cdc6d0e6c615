"""Command line: argument parsing -> Hydra compose -> validation -> commands.py; nothing else.

    lotaqaf <command> [recipe=NAME] [key=value ...] [short flags] [--cfg] [--debug]
    lotaqaf recipes
"""

from __future__ import annotations

import argparse
import os
import sys

from . import interrupts
from .errors import LotaqafError

COMMANDS = {
    "train": "run the chain the recipe names in `stages` (quantize -> train -> ppl -> merge -> eval)",
    "quantize": "GPTQ-quantize the recipe's model (cached by content)",
    "merge": "merge a trained adapter losslessly into its quantized base",
    "eval": "evaluate a model (MMLU 5-shot via lm-eval or the fast scorer, held-out perplexity)",
    "export": "export a merged model (gguf, torchao, gptq, hf16) and check it in the engines that serve it",
    "plan": "the memory each stage of the recipe needs, from the model's config alone (plan.device_gb=80)",
}


# Short flags: aliases that set config keys (the only configuration is the composed config).
FLAGS = {  # argparse dest -> (config key, how the flag's value becomes the override's value)
    "tasks": ("eval.tasks", lambda v: "[" + ",".join(t.strip() for t in v.split(",") if t.strip()) + "]"),
    "model": ("eval.model", str), "limit": ("eval.limit", str), "engine": ("eval.engine", str),
    "num_fewshot": ("eval.num_fewshot", str), "gsm8k_file": ("eval.gsm8k_file", str),
    "sql_file": ("eval.sql_file", str), "viggo_file": ("eval.viggo_file", str),
    "mmlu_source": ("eval.mmlu_source", str), "format": ("export.format", str),
    "allow_lossy": ("export.allow_lossy", lambda v: "true"), "unmerge": ("merge.unmerge", lambda v: "true"),
    "no_verify": ("merge.verify", lambda v: "false"),
}
RUN_COMMANDS = ("merge", "eval", "export")  # act on an existing run


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lotaqaf",
        description="Lossless ternary adaptation (LoTA-QAF) of GPTQ-quantized language models.",
        epilog="Commands: " + "; ".join(f"{k}: {v}" for k, v in COMMANDS.items())
        + ". `lotaqaf recipes` lists the recipes. Every command takes recipe=NAME and key=value overrides; "
        "run=DIR is run.dir=DIR.")
    p.add_argument("command", choices=[*COMMANDS, "recipes"], help="the command")
    p.add_argument("overrides", nargs="*", help="recipe=NAME and key=value overrides (Hydra syntax)")
    p.add_argument("--cfg", action="store_true", help="print the resolved config and exit")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--no-verify", action="store_true", default=None, help="merge: merge.verify=false")
    p.add_argument("--unmerge", action="store_true", default=None, help="merge: merge.unmerge=true")
    p.add_argument("--format", default=None, help="export: export.format (gguf | torchao | gptq | hf16)")
    p.add_argument("--allow-lossy", action="store_true", default=None, help="export: export.allow_lossy=true")
    p.add_argument("--tasks", default=None, help="eval: eval.tasks, comma-separated (mmlu, ppl, gsm8k, sql, viggo, or any "
                   "task lm-eval knows)")
    p.add_argument("--model", default=None, help="eval: eval.model (16bit | gptq | adapter | merged, or a path)")
    p.add_argument("--limit", default=None, help="eval: eval.limit (questions per MMLU subject)")
    p.add_argument("--engine", default=None, help="eval: eval.engine (lm-eval | fast)")
    p.add_argument("--num-fewshot", default=None, help="eval: eval.num_fewshot")
    p.add_argument("--gsm8k-file", default=None, help="eval: eval.gsm8k_file (a local GSM8K-style JSONL)")
    p.add_argument("--sql-file", default=None, help="eval: eval.sql_file (HALO's SQL JSONL layout)")
    p.add_argument("--viggo-file", default=None, help="eval: eval.viggo_file (a local GEM/viggo-layout JSONL)")
    p.add_argument("--mmlu-source", default=None, help="eval: eval.mmlu_source (auto | hub | offline)")
    return p


def overrides_of(args) -> list[str]:
    """The command's overrides: run=DIR as run.dir=DIR, then the short flags as their config keys."""
    out = [f"run.dir={ov.split('=', 1)[1]}" if ov.startswith("run=") else ov for ov in args.overrides]
    for dest, (key, value) in FLAGS.items():
        v = getattr(args, dest)
        if v is not None:
            out.append(f"{key}={value(v)}")
    return out


def _recipe_of_run(command: str, overrides: list[str]) -> list[str]:
    """merge/eval/export compose with the recipe of the run they act on, unless recipe= is given."""
    from .config import group_options
    from .io.rundir import NEEDS, find_run

    given = dict(o.split("=", 1) for o in overrides)
    if "recipe" in given:
        return []
    try:
        run = find_run(given.get("run.dir"), given.get("run.root", "runs"), NEEDS[command])
        name = run.config().get("name")
    except LotaqafError:
        return []  # the command reports a missing run, after the config is checked
    return [f"recipe={name}"] if name in group_options("recipe") else []


def _print_recipes() -> None:
    from rich.table import Table

    from . import ui
    from .config import DEFAULT_RECIPE, list_recipes

    t = Table(title="recipes (lotaqaf train recipe=NAME)")
    t.add_column("recipe")
    t.add_column("what it runs")
    for name, desc in list_recipes():
        t.add_row(name + (" (default)" if name == DEFAULT_RECIPE else ""), desc)
    ui.console.print(t)


def _run(args) -> int:
    from .config import compose, to_yaml, validate

    if args.command == "recipes":
        _print_recipes()
        return 0
    overrides = overrides_of(args)
    if args.command in RUN_COMMANDS:
        overrides = _recipe_of_run(args.command, overrides) + overrides
    cfg = compose(overrides)
    if args.cfg:
        sys.stdout.write(to_yaml(cfg))
        return 0
    validate(cfg, args.command)
    from .commands import run_command

    run_command(args.command, cfg)
    return 0


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_intermixed_args(argv)
    if not args.debug:
        from .ui import silence_third_party_progress

        silence_third_party_progress()
    try:
        with interrupts.installed():
            return _run(args)
    except LotaqafError as e:  # interrupts.Interrupted too: exit 130 (SIGINT) or 143 (SIGTERM)
        if args.debug:
            raise
        from . import dist

        if isinstance(e, dist.Relayed) or (dist.launched() and _rank() != 0 and not dist.active()
                                           and not isinstance(e, interrupts.Interrupted)):
            return e.exit_code  # rank 0 says it (the same check failed there, or it relayed its error)
        where = f" (rank {_rank()})" if dist.launched() else ""
        print(f"lotaqaf{where}: {'' if isinstance(e, interrupts.Interrupted) else 'error: '}{e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # disk full, permission denied... while reading or writing a file
        if args.debug or e.strerror is None:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"lotaqaf: error: {where}{e.strerror}", file=sys.stderr)
        return 2
    except Exception as e:  # under torchrun: one line naming the failing rank, not a traceback per rank
        from . import dist

        if args.debug or not dist.launched():
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"lotaqaf (rank {_rank()}): error: {type(e).__name__}: {first} (--debug shows the traceback)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a signal before the handlers were installed
        print("lotaqaf: interrupted", file=sys.stderr)
        return 130
