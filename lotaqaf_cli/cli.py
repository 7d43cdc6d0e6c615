"""Command line: argument parsing -> Hydra compose -> stage call; nothing else.

    lotaqaf <stage> [recipe=NAME] [key=value ...] [--cfg] [--debug]
    lotaqaf recipes
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import LotaqafError

STAGES = {
    "train": "run the chain the recipe names in `stages` (quantize -> train -> ppl -> merge -> eval)",
    "quantize": "GPTQ-quantize the recipe's model (cached by content)",
    "merge": "merge a trained adapter losslessly into its quantized base",
    "eval": "evaluate a model (MMLU 5-shot via lm-eval or the fast scorer, held-out perplexity)",
    "export": "export a merged model (gptq, gguf, hf16)",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lotaqaf",
        description="Lossless ternary adaptation (LoTA-QAF) of GPTQ-quantized language models.",
        epilog="Stages: " + "; ".join(f"{k}: {v}" for k, v in STAGES.items())
        + ". `lotaqaf recipes` lists the recipes.")
    p.add_argument("stage", choices=[*STAGES, "recipes"], help="what to run")
    p.add_argument("overrides", nargs="*", help="recipe=NAME and key=value overrides (Hydra syntax)")
    p.add_argument("--cfg", action="store_true", help="print the resolved config and exit")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--verify", dest="verify", action="store_true", default=True,
                   help="merge: re-check the written checkpoint (default)")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="merge: skip the re-check from disk")
    p.add_argument("--unmerge", action="store_true", help="merge: restore the base from the merged checkpoint")
    p.add_argument("--format", default=None, help="export: gptq | gguf | hf16")
    p.add_argument("--allow-lossy", action="store_true", help="export: allow a format that changes outputs")
    p.add_argument("--tasks", default="mmlu", help="eval: comma-separated, from mmlu, ppl, gsm8k")
    p.add_argument("--model", default=None,
                   help="eval: 16bit | gptq | adapter | merged (of run=DIR or the newest run) or a model path")
    p.add_argument("--limit", type=int, default=None, help="eval: questions per MMLU subject")
    p.add_argument("--engine", default="lm-eval", choices=["lm-eval", "fast"], help="eval: MMLU scorer")
    p.add_argument("--num-fewshot", type=int, default=5, help="eval: MMLU few-shot examples (0-5)")
    p.add_argument("--gsm8k-file", default=None,
                   help="eval: a local GSM8K-style JSONL (question, answer) instead of openai/gsm8k from the hub")
    p.add_argument("--mmlu-source", default="auto", choices=["auto", "hub", "offline"], help="eval: MMLU data")
    return p


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
    from .config import compose, to_yaml

    if args.stage == "recipes":
        _print_recipes()
        return 0
    if args.stage in ("merge", "export", "eval"):
        run = None
        for ov in args.overrides:
            key, _, value = ov.partition("=")
            if key != "run" or not value:
                raise LotaqafError(f"{args.stage} takes only run=DIR, got '{ov}'")
            run = value
        if args.stage == "eval":
            from .stages import evaluate

            evaluate.run_eval(run, args.tasks, args.model, args.limit, args.engine, args.num_fewshot,
                              args.mmlu_source, gsm8k_file=args.gsm8k_file)
        elif args.stage == "merge":
            from .stages import merge

            merge.run_merge(run, verify=args.verify, unmerge=args.unmerge)
        else:
            from .stages import export

            if not args.format:
                raise LotaqafError("export needs --format gptq|gguf|hf16")
            export.run_export(run, args.format, allow_lossy=args.allow_lossy)
        return 0
    cfg = compose(list(args.overrides))
    if args.cfg:
        sys.stdout.write(to_yaml(cfg))
        return 0

    import torch

    from . import ui
    from .io.rundir import RunDir
    from .stages import evaluate, merge, quantize, train
    from .stages.common import Context

    if torch.get_num_threads() > (os.cpu_count() or 1):
        torch.set_num_threads(os.cpu_count() or 1)
    if "train" in cfg.stages and args.stage == "train":
        train.check_adapter_config(cfg)
    torch.manual_seed(cfg.seed)
    ctx = Context(cfg=cfg, run=RunDir(cfg))
    stages = ["quantize"] if args.stage == "quantize" else list(cfg.stages)
    available = {"quantize": quantize.run, "train": train.run, "ppl": evaluate.run_ppl,
                 "merge": merge.run_in_chain, "eval": evaluate.run_in_chain}
    for name in stages:
        if name not in available:
            ui.say(f"[yellow]stage '{name}' is not implemented yet: skipped[/yellow]")
            continue
        ui.say(f"[bold]== {name} ==[/bold]")
        available[name](ctx)
        ctx.run.log(f"stage {name} done")
    ui.say(f"run directory: {ctx.run.path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_intermixed_args(argv)
    try:
        return _run(args)
    except LotaqafError as e:
        if args.debug:
            raise
        print(f"lotaqaf: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("lotaqaf: interrupted", file=sys.stderr)
        return 130
