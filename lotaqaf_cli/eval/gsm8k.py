"""GSM8K exact match of an in-memory model through lm-eval's own ``gsm8k`` task, 0-shot, greedy.

The paper's task-specific metric: greedy generation, exact match of the number after "####"
(lm-eval's ``strict-match`` filter); lm-eval's ``flexible-extract`` (the last number in the answer)
is reported next to it. Data: ``openai/gsm8k`` test split from the hub, or a local JSONL file with
``question`` and ``answer`` fields (the GSM8K layout) through a generated task that includes
lm-eval's gsm8k.yaml and replaces only the dataset. The prompt is rendered with the tokenizer's chat
template when it has one, as the training data of ``data=gsm8k`` is (see docs/decisions.md).
Nothing is written here.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path

from ..errors import LotaqafError
from .harness import lm_eval_version, offline_env, quiet_libraries

HUB_TASK = "gsm8k"
LOCAL_TASK = "lotaqaf_gsm8k_local"
STRICT, FLEXIBLE = "exact_match,strict-match", "exact_match,flexible-extract"
HUB_UNREACHABLE = ("gsm8k needs the Hugging Face hub (openai/gsm8k), which is unreachable; offline, give a "
                   "local copy with --gsm8k-file FILE.jsonl, or evaluate mmlu or ppl")


def _lm_eval_gsm8k_yaml() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"


def local_task(data_file: str | Path, out_dir: str | Path, max_gen_toks: int | None = None) -> str:
    """Write a task ``lotaqaf_gsm8k_local`` that is lm-eval's gsm8k on ``data_file``; returns the
    include path."""
    data_file = Path(data_file).resolve()
    if not data_file.is_file():
        raise LotaqafError(f"GSM8K data file not found: {data_file}")
    for n, line in enumerate(data_file.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                raise LotaqafError(f"{data_file}:{n}: not a JSON line") from None
            if not isinstance(doc, dict) or not {"question", "answer"} <= set(doc):
                raise LotaqafError(f"{data_file}:{n}: a GSM8K row needs 'question' and 'answer' fields")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"include": str(_lm_eval_gsm8k_yaml()), "task": LOCAL_TASK, "tag": [], "dataset_path": "json",
           "dataset_name": None, "dataset_kwargs": {"data_files": {"train": str(data_file), "test": str(data_file)}}}
    if max_gen_toks is not None:
        cfg["generation_kwargs"] = {"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False,
                                    "temperature": 0.0, "max_gen_toks": int(max_gen_toks)}
    (out / f"{LOCAL_TASK}.yaml").write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    return str(out)


def evaluate_gsm8k(model, tokenizer, limit: int | None = None, batch_size: int = 4, data_file=None,
                   tasks_dir=None, max_gen_toks: int | None = None, chat_template: bool | None = None) -> dict:
    """0-shot greedy GSM8K. Returns a JSON-ready dict with ``exact_match`` (strict: the number after
    "####"), ``flexible_extract``, ``n``, per-sample ``samples`` (question index, target, the
    generated text, the extracted answer, match) and the settings."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if tokenizer is None:
        raise LotaqafError("GSM8K needs a tokenizer; this model has none")
    if limit is not None and limit <= 0:
        raise LotaqafError(f"eval.limit must be a positive number of questions, got {limit}")
    if chat_template is None:
        chat_template = bool(getattr(tokenizer, "chat_template", None))
    local = data_file is not None
    with contextlib.ExitStack() as stack:
        if local:
            if tasks_dir is None:
                tasks_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="lotaqaf_gsm8k_"))
            tm, task = TaskManager(include_path=local_task(data_file, tasks_dir, max_gen_toks),
                                   include_defaults=False), LOCAL_TASK
        else:
            from ..hub import hub_reachable

            if not hub_reachable():
                raise LotaqafError(HUB_UNREACHABLE)
            tm, task = TaskManager(), HUB_TASK
        gen_kwargs = None if local or max_gen_toks is None else f"max_gen_toks={int(max_gen_toks)}"
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        t0 = time.time()
        stack.enter_context(offline_env(local))
        stack.enter_context(quiet_libraries())
        try:
            out = simple_evaluate(model=lm, tasks=[task], num_fewshot=0, limit=limit, task_manager=tm,
                                  log_samples=True, bootstrap_iters=0, apply_chat_template=chat_template,
                                  gen_kwargs=gen_kwargs, random_seed=0, numpy_random_seed=1234,
                                  torch_random_seed=1234, fewshot_random_seed=1234)
        except (ConnectionError, OSError) as e:
            raise LotaqafError(f"lm-eval could not load the GSM8K data: {str(e).splitlines()[0]}") from None
    seconds = time.time() - t0
    res = out["results"][task]
    samples = []
    for d in sorted(out["samples"][task], key=lambda d: d["doc_id"]):
        if d["filter"] != "strict-match":
            continue
        samples.append({"doc_id": d["doc_id"], "target": d["target"], "generated": d["resps"][0][0],
                        "extracted": d["filtered_resps"][0], "exact_match": float(d["exact_match"])})
    return {"task": "gsm8k", "source": "local" if local else "hub", "data_file": None if not local else str(data_file),
            "exact_match": res[STRICT], "flexible_extract": res[FLEXIBLE], "n": len(samples),
            "num_fewshot": 0, "limit": limit, "chat_template": chat_template, "max_gen_toks": max_gen_toks,
            "lm_eval_version": lm_eval_version(), "seconds": round(seconds, 2), "samples": samples}
