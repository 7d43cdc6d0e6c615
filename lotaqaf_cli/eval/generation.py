"""Task-specific exact match (GSM8K, SQL, ViGGO) of an in-memory model: 0-shot greedy generation.

The protocol of the paper's Table 1 (HALO's evaluation code, which the LoTA-QAF authors reuse):
greedy decoding up to ``max_length`` tokens in all (prompt + answer, as transformers' ``max_length``;
512 in the paper; here per item, where HALO's batches count their longest prompt: docs/decisions.md),
stopping at the tokenizer's end-of-sequence token; the answer is the generated
text decoded without special tokens and stripped. Scores:

    gsm8k   the text after the last "####" (the whole answer when there is none), stripped
    sql     the exact string (after stripping both)
    viggo   the function name (the text before the first "("), then the attribute pieces: the text
            inside the outer parentheses split at every comma, each piece stripped, compared as
            sorted lists; attribute order does not matter, values and case do

Prompts are rendered with the chat template exactly as training renders them (data/tasks.py) and
tokenized without adding special tokens, so the model sees at evaluation the ids it was trained on.
Nothing is written here.
"""

from __future__ import annotations

import time

import torch

from ..data import tasks as task_data
from ..data.sft import prompt_ids
from ..errors import LotaqafError

MAX_LENGTH = 512


def gsm8k_match(pred: str, label: str) -> bool:
    return pred.split("####")[-1].strip() == label.split("####")[-1].strip()


def sql_match(pred: str, label: str) -> bool:
    return pred.strip() == label.strip()


def _viggo_parts(mr: str) -> tuple[str, list[str]]:
    mr = mr.strip()
    fn = mr.split("(", 1)[0]
    inside = mr[len(fn):].strip("()")
    return fn, sorted(p.strip() for p in inside.split(","))


def viggo_match(pred: str, label: str) -> bool:
    """The same function and the same attribute pieces (names and values), in any attribute order."""
    return _viggo_parts(pred) == _viggo_parts(label)


MATCH = {"gsm8k": gsm8k_match, "sql": sql_match, "viggo": viggo_match}


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[list[int]], max_length: int = MAX_LENGTH, batch_size: int = 8,
                    progress=None) -> list[str]:
    """Greedy continuations of ``prompts`` (token ids), batched with left padding: each prompt continued
    until eos or ``max_length`` tokens in all (its own prompt included, whatever the batch), decoded
    without special tokens and stripped. ``progress(n)`` is called per batch."""
    eos = tokenizer.eos_token_id
    pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, p in enumerate(chunk):
            ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p):] = 1
        new = max_length - min(len(p) for p in chunk)  # the shortest prompt's budget; each is cut to its own
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max(new, 1),
                             do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
                             eos_token_id=eos, pad_token_id=pad).cpu()
        for p, g in zip(chunk, gen, strict=True):
            g = g[width:width + max(max_length - len(p), 0)].tolist()
            if eos in g:
                g = g[:g.index(eos) + 1]
            out.append(tokenizer.decode(g, skip_special_tokens=True).strip())
        if progress is not None:
            progress(len(chunk))
    return out


def eval_rows(name: str, data_file=None, limit: int | None = None) -> list[dict]:
    """The first ``limit`` rows of task ``name``'s test data: ``data_file`` (a local file in the task's
    layout) or its hub test split."""
    t = task_data.task(name)
    if limit is not None and limit <= 0:
        raise LotaqafError(f"eval.limit must be a positive number of items, got {limit}")
    return task_data.rows(t, data_file, t.eval_split)[:limit]


def evaluate_task(model, tokenizer, name: str, rows: list[dict], data_file=None, batch_size: int = 8,
                  max_length: int = MAX_LENGTH, progress=None) -> dict:
    """0-shot greedy exact match of task ``name`` (gsm8k | sql | viggo) on ``rows`` (:func:`eval_rows`). Returns a
    JSON-ready dict with ``exact_match``, ``n`` and per-item ``samples`` (index, target, generated,
    exact_match)."""
    t = task_data.task(name)
    if tokenizer is None:
        raise LotaqafError(f"{t.title} needs a tokenizer; this model has none")
    prompts = [prompt_ids(tokenizer, task_data.prompt_messages(t, r)) for r in rows]
    t0 = time.time()
    model.eval()
    generated = greedy_generate(model, tokenizer, prompts, max_length, batch_size, progress)
    samples = [{"index": i, "target": t.answer(r), "generated": g, "exact_match": float(MATCH[name](g, t.answer(r)))}
               for i, (r, g) in enumerate(zip(rows, generated, strict=True))]
    n = len(samples)
    return {"task": name, "source": "local" if data_file else f"hub:{t.hub}/{t.eval_split}",
            "data_file": str(data_file) if data_file else None, "exact_match": sum(s["exact_match"] for s in samples) / n,
            "n": n, "num_fewshot": 0, "max_length": max_length, "batch_size": batch_size,
            "seconds": round(time.time() - t0, 2), "samples": samples}
