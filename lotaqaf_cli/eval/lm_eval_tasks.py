"""Any other task lm-eval knows, passed through with the run's model: ``lotaqaf eval --tasks arc_easy``.

lotaqaf's own tasks (mmlu, ppl, gsm8k, sql, viggo) have their own integrations (lm-eval's own
``gsm8k`` is shadowed by ours; its variants, e.g. gsm8k_cot, pass through). Every other name goes to
lm-eval's ``simple_evaluate`` as it is, with the model in memory, the task's own few-shot setting
(``eval.num_fewshot`` is MMLU's) and ``eval.limit``. ``eval.lm_eval_include`` adds a folder of task
YAML files (lm-eval's include_path), e.g. a task on local data. lm-eval indexes its ~15k task files
once per process (seconds); a folder that holds every name asked for is indexed alone. Nothing is
written here.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import time
from pathlib import Path

from ..errors import LotaqafError
from .generation import MATCH
from .harness import lm_eval_version, offline_env, quiet_libraries

OWN_TASKS = ("mmlu", "ppl", *MATCH)  # lotaqaf's own integrations; any other name is lm-eval's


def include_path(folder: str | None) -> str | None:
    """``eval.lm_eval_include`` as the absolute folder lm-eval's TaskManager takes (None: none)."""
    return str(Path(folder).expanduser().resolve()) if folder else None


@functools.lru_cache(maxsize=8)
def _task_manager(include_path: str | None, defaults: bool = True):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=defaults) if include_path else TaskManager()


def _manager_for(names: list[str], include_path: str | None):
    """The include folder's own index when it holds every name (it takes no time), else lm-eval's whole
    index with the folder's tasks added."""
    if include_path:
        folder = _task_manager(include_path, False)
        if all(n in folder.all_tasks for n in names):
            return folder
    return _task_manager(include_path)


def check(names: list[str], include_path: str | None = None, own: tuple[str, ...] = OWN_TASKS) -> None:
    """One-line LotaqafError for a name that is neither lotaqaf's nor lm-eval's, naming close ones."""
    others = [n for n in names if n not in own]
    if not others:
        return
    try:
        every = _manager_for(others, include_path).all_tasks
    except ImportError:
        raise LotaqafError(f"eval task '{others[0]}' is not one of lotaqaf's ({', '.join(own)}) and lm-eval is "
                           "not installed") from None
    for n in others:
        if n not in every:
            close = difflib.get_close_matches(n, [*own, *every], n=4, cutoff=0.6)
            raise LotaqafError(f"unknown eval task '{n}': neither lotaqaf's ({', '.join(own)}) nor lm-eval's"
                               + (f"; close: {', '.join(close)}" if close else ""))


def evaluate(model, tokenizer, names: list[str], limit: int | None = None, batch_size: int = 4,
             include_path: str | None = None) -> dict:
    """``names`` through lm-eval on the in-memory model: ``{task: {metric: value}}`` plus the settings."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from ..hub import hub_reachable

    if tokenizer is None:
        raise LotaqafError("lm-eval tasks need a tokenizer; this model has none")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    t0 = time.time()
    with contextlib.ExitStack() as stack:
        stack.enter_context(offline_env(not hub_reachable()))  # fail in a second, not after retries
        stack.enter_context(quiet_libraries())
        try:
            out = simple_evaluate(model=lm, tasks=list(names), limit=limit,
                                  task_manager=_manager_for(list(names), include_path), bootstrap_iters=0,
                                  random_seed=0, numpy_random_seed=1234, torch_random_seed=1234,
                                  fewshot_random_seed=1234)
        except (ConnectionError, OSError) as e:
            raise LotaqafError(f"lm-eval could not load the data of {', '.join(names)}: {str(e).splitlines()[0]} "
                               "(offline: give a task on local data with eval.lm_eval_include=DIR)") from None
    results = {task: {k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
               for task, r in out["results"].items()}
    return {"tasks": list(names), "results": results, "n_samples": out.get("n-samples", {}), "limit": limit,
            "lm_eval_version": lm_eval_version(), "seconds": round(time.time() - t0, 2)}
