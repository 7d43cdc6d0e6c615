"""Stage `ppl`: held-out perplexity of the 16-bit and the quantized model on the same windows.

Reads: held-out text (ppl.*; never used for calibration or training), the context's models.
Writes: <run>/ppl.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rich.table import Table

from .. import ui
from ..core.perplexity import perplexity
from ..errors import LotaqafError
from .common import Context, load_source, text_windows


def run_ppl(ctx: Context) -> dict:
    cfg = ctx.cfg
    src = load_source(ctx)
    windows, digest = text_windows(ctx, "heldout", cfg.ppl)
    models = {} if src.quantized else {"16-bit": src.model}
    if ctx.quantized is not None:
        models[f"GPTQ INT{cfg.quant.bits} g{cfg.quant.group_size}"] = ctx.quantized
    if ctx.adapted is not None:
        models[f"GPTQ + {cfg.adapter.name} (adapter)"] = ctx.adapted
    results = {}
    for label, model in models.items():
        t0 = time.time()
        with ui.progress_bar(f"perplexity, {label}", windows.shape[0]) as adv:
            ppl, n_tok = perplexity(model, windows, cfg.ppl.batch_size, progress=adv)
        results[label] = {"ppl": ppl, "tokens": n_tok, "seconds": round(time.time() - t0, 1)}
    out = {"heldout_hash": digest, "n_samples": windows.shape[0], "seq_len": windows.shape[1],
           "source": cfg.ppl.source, "results": results}
    ctx.run.write_json("ppl.json", out)
    t = Table(title=f"held-out perplexity ({windows.shape[0]} x {windows.shape[1]} tokens, source={cfg.ppl.source})")
    t.add_column("model")
    t.add_column("perplexity", justify="right")
    t.add_column("tokens", justify="right")
    for label, r in results.items():
        t.add_row(label, f"{r['ppl']:.3f}", str(r["tokens"]))
    if not ui.quiet():
        ui.console.print(t)
    return out


# ---------------------------------------------------------------------------------------------
# `lotaqaf eval`: evaluate one model of a run (or a model directory) on MMLU and/or perplexity
# ---------------------------------------------------------------------------------------------

EVAL_TASKS = ("mmlu", "ppl", "gsm8k")
RUN_MODELS = ("16bit", "gptq", "adapter", "merged")


def _load_for_eval(model_sel: str | None, run_dir):
    """(model, tokenizer, label) for a run keyword (16bit | gptq | adapter | merged) or a path."""
    from omegaconf import OmegaConf

    from ..io.checkpoint import load_quantized
    from ..io.models import load_model
    from .merge import load_adapted

    sel = model_sel or "merged"
    if sel not in RUN_MODELS:
        p = Path(sel)
        if not p.exists():
            raise LotaqafError(f"--model {sel}: no such path (or use one of {', '.join(RUN_MODELS)} with run=DIR)")
        if p.is_dir() and not ((p / "quantize_config.json").is_file() or (p / "config.json").is_file()):
            raise LotaqafError(f"--model {sel} is not a model directory (no config.json or quantize_config.json)")
        lm = load_model(str(p))
        return lm.model, lm.tokenizer, p.name, None
    if run_dir is None:
        raise LotaqafError(f"--model {sel} needs a run: give run=DIR or train one first")
    cfg = OmegaConf.load(Path(run_dir) / "config.yaml")
    if sel == "16bit":
        lm = load_model(cfg.model.path, cfg.model.dtype)
        return lm.model, lm.tokenizer, "16bit", cfg
    if sel == "gptq":
        q = Path(run_dir) / "quantize.json"
        if not q.is_file():
            raise LotaqafError(f"run {run_dir} has no quantized base (quantize.json)")
        model, tok, _ = load_quantized(json.loads(q.read_text())["checkpoint"])
        return model, tok, "gptq", cfg
    if sel == "adapter":
        _cfg, _base, model, tok, *_ = load_adapted(Path(run_dir))
        return model, tok, "adapter", cfg
    merged = Path(run_dir) / "merged"
    if not (merged / "quantize_config.json").is_file():
        raise LotaqafError(f"run {run_dir} has no merged model: run `lotaqaf merge run={run_dir}` first")
    model, tok, _ = load_quantized(merged)
    return model, tok, "merged", cfg


@torch.no_grad()
def run_eval(run: str | None, tasks: str, model_sel: str | None, limit: int | None, engine: str,
             num_fewshot: int, mmlu_source: str = "auto", gsm8k_file: str | None = None) -> dict:
    """Evaluate and write eval-<model>.json / .md into the run directory (or ./evals)."""
    from ..io.checkpoint import write_json_atomic, write_text_atomic
    from .merge import find_run, heldout_windows

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    bad = [t for t in names if t not in EVAL_TASKS]
    if bad or not names:
        raise LotaqafError(f"unknown task '{bad[0] if bad else tasks}'; valid: {', '.join(EVAL_TASKS)}")
    if limit is not None and limit <= 0:
        raise LotaqafError(f"--limit must be a positive number of questions per subject, got {limit}")
    if gsm8k_file is not None and not Path(gsm8k_file).is_file():
        raise LotaqafError(f"--gsm8k-file {gsm8k_file}: no such file")
    if "gsm8k" in names and gsm8k_file is None:
        from ..io.models import hub_reachable
        from .gsm8k_eval import HUB_UNREACHABLE

        if not hub_reachable():
            raise LotaqafError(HUB_UNREACHABLE)
    run_dir = None
    if run or (model_sel in RUN_MODELS or model_sel is None):
        run_dir = find_run(run) if run else _newest_run()
    model, tok, label, cfg = _load_for_eval(model_sel, run_dir)
    model.eval()
    out: dict = {"model": label, "run": None if run_dir is None else str(run_dir)}
    if "mmlu" in names:
        from .mmlu_eval import evaluate_mmlu, results_markdown, results_table

        res = evaluate_mmlu(model, tok, source=mmlu_source, num_fewshot=num_fewshot, limit=limit, engine=engine)
        out["mmlu"] = res
        if not ui.quiet():
            ui.console.print(results_table(res))
        out["mmlu_markdown"] = results_markdown(res)
    if "gsm8k" in names:
        from .gsm8k_eval import evaluate_gsm8k

        res = evaluate_gsm8k(model, tok, limit=limit, data_file=gsm8k_file)
        out["gsm8k"] = res
        ui.say(f"GSM8K 0-shot exact match (number after ####) of {label}: {100 * res['exact_match']:.2f}% "
               f"of {res['n']} questions (flexible extract {100 * res['flexible_extract']:.2f}%)")
    if "ppl" in names:
        windows = heldout_windows(cfg, _base_info(run_dir)) if cfg is not None else None
        if windows is None:
            raise LotaqafError("ppl needs the run's held-out text (run `lotaqaf train` with the ppl stage first)")
        ppl, n_tok = perplexity(model, windows)
        out["ppl"] = {"ppl": ppl, "tokens": n_tok}
        ui.say(f"held-out perplexity of {label}: {ppl:.4f} over {n_tok} tokens")
    dest = Path(run_dir) if run_dir is not None else Path("evals")
    dest.mkdir(parents=True, exist_ok=True)
    write_json_atomic(dest / f"eval-{label}.json", {k: v for k, v in out.items() if k != "mmlu_markdown"})
    if "mmlu_markdown" in out:
        write_text_atomic(dest / f"eval-{label}.md", out["mmlu_markdown"])
    ui.say(f"results: {dest / f'eval-{label}.json'}")
    return out


def _newest_run():
    from .merge import newest_run

    found = newest_run("runs", "config.yaml")
    if found is None:
        raise LotaqafError("no run under runs/ (train one first, or pass --model PATH)")
    return found


def _base_info(run_dir) -> dict:
    q = json.loads((Path(run_dir) / "quantize.json").read_text())
    return {"quantize_config": json.loads((Path(q["checkpoint"]) / "quantize_config.json").read_text())}


def run_in_chain(ctx) -> None:
    """The `eval` step of `lotaqaf train`: the recipe's eval tasks on the merged LoTA model (or, for
    the LoRA baselines, the adapter model, whose merge is lossy)."""
    cfg = ctx.cfg
    tok = ctx.source.tokenizer if ctx.source is not None else None
    tasks = [t for t in cfg.eval.tasks if t != "mmlu" or tok is not None]
    if not tasks:
        ui.say("eval: this model has no tokenizer: MMLU skipped")
        return
    which = "merged" if cfg.adapter.name == "lota" and (ctx.run.path / "merged").is_dir() else "adapter"
    run_eval(str(ctx.run.path), ",".join(tasks), which, cfg.eval.limit, cfg.eval.engine, cfg.eval.num_fewshot,
             cfg.eval.mmlu_source)
