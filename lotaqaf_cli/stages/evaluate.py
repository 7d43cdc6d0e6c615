"""Stages `ppl` and `eval`: held-out perplexity of several models, and the recipe's eval tasks.

    perplexities(models, windows, batch_size)       -> {label: {ppl, tokens, seconds}}  (the ppl stage)
    evaluate(model, tokenizer, ev, label, windows)  -> results of ev.tasks (mmlu | ppl | gsm8k | sql | viggo |
                                                       any task lm-eval knows)

Take the recipe's `ppl` / `eval` sections. The task integrations are in lotaqaf_cli/eval.
"""

from __future__ import annotations

import contextlib
import time

import torch
from omegaconf import DictConfig
from rich.table import Table

from .. import ui
from ..core.perplexity import perplexity
from ..errors import LotaqafError
from ..eval import lm_eval_tasks
from ..eval.generation import MATCH, eval_rows, evaluate_task
from ..eval.mmlu import evaluate_mmlu, results_markdown, results_table
from ..precision import dtype_name


def perplexities(models: dict, windows: torch.Tensor, batch_size: int) -> dict:
    results = {}
    for label, model in models.items():
        t0 = time.time()
        with ui.progress_bar(f"perplexity, {label}", windows.shape[0], unit="windows") as adv:
            ppl, n_tok = perplexity(model, windows, batch_size, progress=adv)
        results[label] = {"ppl": ppl, "tokens": n_tok, "seconds": round(time.time() - t0, 1)}
    return results


def show_perplexities(results: dict, windows: torch.Tensor, source: str) -> None:
    t = Table(title=f"held-out perplexity ({windows.shape[0]} x {windows.shape[1]} tokens, source={source})")
    t.add_column("model")
    t.add_column("perplexity", justify="right")
    t.add_column("tokens", justify="right")
    for label, r in results.items():
        t.add_row(label, f"{r['ppl']:.3f}", str(r["tokens"]))
    if not ui.quiet():
        ui.console.print(t)


def _lm_eval_status(what: str, via_lm_eval: bool = True):
    """lm-eval's own progress bars are off (they flood logs): say what runs instead."""
    return ui.status(f"{what} via lm-eval ...") if via_lm_eval else contextlib.nullcontext()


@torch.no_grad()
def evaluate(model, tokenizer, ev: DictConfig, label: str, windows: torch.Tensor | None = None,
             tasks: list[str] | None = None) -> dict:
    """``tasks`` (default ev.tasks; ``ev`` is the `eval` section) on one model. Returns a JSON-ready
    dict; an MMLU report in Markdown is under ``mmlu_markdown``."""
    tasks = list(ev.tasks) if tasks is None else tasks
    model.eval()
    out: dict = {"model": label, "dtype": dtype_name(model)}
    if "mmlu" in tasks:
        with _lm_eval_status(f"MMLU {ev.num_fewshot}-shot of {label}", ev.engine == "lm-eval"):
            res = evaluate_mmlu(model, tokenizer, source=ev.mmlu_source, num_fewshot=ev.num_fewshot, limit=ev.limit,
                                engine=ev.engine, batch_size=ev.batch_size)
        out["mmlu"] = res
        if not ui.quiet():
            ui.console.print(results_table(res))
        out["mmlu_markdown"] = results_markdown(res)
    for name in MATCH:  # the generation tasks: gsm8k, sql, viggo
        if name in tasks:
            rows = eval_rows(name, ev[f"{name}_file"], ev.limit)
            with ui.progress_bar(f"{name} of {label}, greedy", len(rows), unit="items") as adv:
                out[name] = res = evaluate_task(model, tokenizer, name, rows, ev[f"{name}_file"], ev.batch_size,
                                                ev.max_length, progress=adv)
            ui.say(f"{name} 0-shot exact match of {label}: {100 * res['exact_match']:.2f}% of {res['n']} items "
                   f"(greedy, up to {ev.max_length} tokens)")
    passed = [t for t in tasks if t not in lm_eval_tasks.OWN_TASKS]
    if passed:
        with _lm_eval_status(f"{', '.join(passed)} of {label}"):
            res = lm_eval_tasks.evaluate(model, tokenizer, passed, limit=ev.limit, batch_size=ev.batch_size,
                                         include_path=lm_eval_tasks.include_path(ev.lm_eval_include))
        out["lm_eval"] = res
        for task, metrics in res["results"].items():
            ui.say(f"{task} of {label}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if "ppl" in tasks:
        if windows is None:
            raise LotaqafError("ppl needs the run's held-out text (run `lotaqaf train` with the ppl stage first)")
        ppl, n_tok = perplexity(model, windows)
        out["ppl"] = {"ppl": ppl, "tokens": n_tok}
        ui.say(f"held-out perplexity of {label}: {ppl:.4f} over {n_tok} tokens")
    return out
