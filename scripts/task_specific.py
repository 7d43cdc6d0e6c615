"""The task-specific half of the paper's Table 1 at small scale: SmolLM2-135M-Instruct on the synthetic
ViGGO-layout task shipped with lotaqaf (recipe smollm2_viggo_synth), offline, on this machine.

    python scripts/task_specific.py                      # INT3 and INT2, the recipe's 128 steps
    python scripts/task_specific.py --bits 3 --steps 8 --limit 10 --out /tmp/ts   # a quick look

Per bit width: the GPTQ base (the recipe's quantizer, cached under <root>/_cache), scored before any
fine-tuning beside the 16-bit model; then GPTQ + LoRA (AdamW, the paper's task learning rate 5e-4) and
LoTA-QAF (t-SignSGD, omega 0.875 r) trained on the same data, steps and seed. Every model is scored by
0-shot greedy exact match (eval/generation.py: function name and attribute pieces, up to 512 tokens in
all) on the same test sentences. The LoTA-QAF row is the MERGED model, loaded from its checkpoint; its
adapter model is scored too and must give the same text on every item, or the script fails.

The data is SYNTHETIC (scripts/make_viggo_synth.py: invented games and template sentences in
GEM/viggo's layout): its numbers say how each method learns a structured task at this scale, and are not
comparable with the paper's ViGGO column. Writes <out>.md and <out>.json through temporary files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

from lotaqaf_cli import precision, ui
from lotaqaf_cli.chain import run_step
from lotaqaf_cli.config import compose, validate
from lotaqaf_cli.data.tasks import VIGGO_FUNCTIONS
from lotaqaf_cli.eval.generation import eval_rows, evaluate_task
from lotaqaf_cli.io.files import write_json_atomic, write_text_atomic
from lotaqaf_cli.io.rundir import RunDir
from lotaqaf_cli.session import Session

RECIPE = "smollm2_viggo_synth"
GROUP_SIZE = {4: 64, 3: 64, 2: 32}    # as scripts/reproduce.py
METHODS = {"lora": ["adapter=lora", "optim.lr=5e-4"], "lota": ["adapter=lota"]}
MR_FORM = re.compile(r"^(%s)\((\w+\[[^\]]*\](, )?)*\)$" % "|".join(VIGGO_FUNCTIONS))
LABELS = {"base": "16-bit", "gptq": "GPTQ", "lora": "GPTQ+LoRA", "lota": "LoTA-QAF (merged)"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=[3, 2])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per method (default: the recipe's)")
    p.add_argument("--limit", type=int, default=None, help="test items (default: all 100)")
    p.add_argument("--max-length", type=int, default=512, help="tokens in all per generation (default 512)")
    p.add_argument("--batch-size", type=int, default=50, help="generations per batch (default 50: each decoding "
                   "step unpacks the quantized weights once for the whole batch)")
    p.add_argument("--root", default="runs")
    p.add_argument("--out", default="docs/results/viggo_synth")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--render", metavar="JSON", help="only rewrite <out>.md from a results JSON of this script")
    return p.parse_args(argv)


def run_config(args, bits: int, method: str, stamp: str):
    ov = [f"recipe={RECIPE}", f"quant.bits={bits}", f"quant.group_size={GROUP_SIZE[bits]}", *METHODS[method],
          f"run.root={args.root}", f"run.dir={args.root}/task_specific/{stamp}/int{bits}_{method}",
          f"precision={args.precision}"]
    if args.steps:
        ov += [f"optim.steps={args.steps}", f"optim.save_every={args.steps}"]
    cfg = compose(ov)
    validate(cfg)
    return cfg


def score(model, tok, rows, args, what: str) -> dict:
    with ui.progress_bar(f"{what}: greedy", len(rows), unit="items") as adv:
        res = evaluate_task(model, tok, "viggo", rows, batch_size=args.batch_size, max_length=args.max_length,
                            progress=adv)
    ui.say(f"{what}: exact match {100 * res['exact_match']:.1f}% of {res['n']} ({res['seconds']:.0f} s)")
    return res


def row(method: str, bits, res: dict, **extra) -> dict:
    return {"method": method, "bits": bits, "label": LABELS[method], "exact_match": res["exact_match"],
            "n": res["n"], "eval_seconds": res["seconds"], "samples": res["samples"], **extra}


def run(args) -> dict:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    t_all = time.time()
    rows_out, checks, source, items, cfg = [], [], None, None, None
    for bits in args.bits:
        for i, method in enumerate(METHODS):
            cfg = run_config(args, bits, method, stamp)
            torch.manual_seed(cfg.seed)
            ses = Session(cfg, RunDir.for_config(cfg), source=source)
            run_step(ses, "quantize")
            source = ses.source
            tok = source.tokenizer
            if items is None:
                items = eval_rows("viggo", cfg.eval.viggo_file, args.limit)
                base = precision.cast_copy(source.model, ses.precision.dtype)
                rows_out.append(row("base", 16, score(base, tok, items, args, "16-bit")))
                del base
            if i == 0:
                rows_out.append(row("gptq", bits, score(ses.base, tok, items, args, f"INT{bits} GPTQ")))
            run_step(ses, "train")
            extra = {"train_seconds": ses.timings["train_s"], "steps": cfg.optim.steps, "run": str(ses.run.path)}
            if method == "lora":
                rows_out.append(row(method, bits, score(ses.adapted, tok, items, args, f"INT{bits} GPTQ+LoRA"),
                                    **extra, lr=cfg.optim.lr))
                continue
            adapter = score(ses.adapted, tok, items, args, f"INT{bits} LoTA-QAF adapter")
            run_step(ses, "merge")
            cert = ses.run.read_record("merge_certificate")
            merged_model, _, info = ses.run.load_merged()  # the written checkpoint, as a user loads it
            ses.place(merged_model)
            merged = score(merged_model, tok, items, args, f"INT{bits} LoTA-QAF merged")
            same = sum(a["generated"] == m["generated"] for a, m in zip(adapter["samples"], merged["samples"], strict=True))
            checks.append({"bits": bits, "items": merged["n"], "same_text": same, "adapter_exact_match": adapter["exact_match"],
                           "merged_exact_match": merged["exact_match"],
                           "certificate_max_abs_logit_diff": cert["max_abs_logit_diff"],
                           "ok": same == merged["n"] and cert["max_abs_logit_diff"] == 0.0})
            rows_out.append(row(method, bits, merged, **extra, omega=cfg.adapter.omega,
                                checkpoint_format=info["quantize_config"]["checkpoint_format"]))
            del merged_model
    return {"recipe": RECIPE, "command": command_line(args), "bits": args.bits, "group_size": {b: GROUP_SIZE[b] for b in args.bits},
            "steps": cfg.optim.steps, "batch_size": cfg.optim.batch_size, "train_examples": "1024 (viggo_synth-train)",
            "test_items": len(items), "max_length": args.max_length, "precision": ses.precision.name,
            "rows": rows_out, "merge_checks": checks, "seconds": round(time.time() - t_all, 1),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads, torch {torch.__version__}",
            "date": time.strftime("%Y-%m-%d")}


def command_line(args) -> str:
    parts = ["python scripts/task_specific.py"]
    if args.bits != [3, 2]:
        parts.append("--bits " + " ".join(map(str, args.bits)))
    for flag in ("steps", "limit"):
        if getattr(args, flag):
            parts.append(f"--{flag} {getattr(args, flag)}")
    if args.max_length != 512:
        parts.append(f"--max-length {args.max_length}")
    if args.precision != "auto":
        parts.append(f"--precision {args.precision}")
    return " ".join(parts)


def markdown(res: dict) -> str:
    lines = [
        "# Task-specific fine-tuning at small scale: SmolLM2-135M-Instruct on a synthetic ViGGO-layout task", "",
        f"Produced by `{res['command']}` on {res['date']} ({res['machine']}; {res['precision']}; "
        f"{res['seconds'] / 60:.1f} min in all).", "",
        "- **Synthetic data.** lotaqaf_cli/data/shipped/viggo_synth-{train,test}.jsonl, made from templates by "
        "scripts/make_viggo_synth.py: invented games and sentences in GEM/viggo's layout, ViGGO's nine dialogue acts "
        "and attribute names. Not ViGGO: these numbers are not comparable with the paper's ViGGO column. The test "
        "sentences are about games that never appear in training.",
        f"- Metric: the paper's ViGGO exact match (function name and attribute pieces, names and values, any attribute "
        f"order), 0-shot, greedy, up to {res['max_length']} tokens in all, on {res['test_items']} test sentences; "
        f"the standard error of an exact match near 50% on {res['test_items']} items is about "
        f"{100 * (0.25 / res['test_items']) ** 0.5:.0f} points."
        + ("" if res["max_length"] == 512 else
           f" {res['max_length']} rather than the paper's 512 to save CPU time: every test prompt plus twice its "
           "answer's tokens fits (at most 383 with SmolLM2's tokenizer), so only an answer spelled in more than twice "
           "the target's tokens could score differently."),
        "- MR form: the text is one of ViGGO's functions applied to bracketed attributes, `fn(attr[...], ...)`; "
        "right function: its function name is the target's (the first half of the rule).",
        "- Train time: wall clock of the training loop on this machine, which at times ran other work too; it is "
        "not a speed comparison (scripts/bench_train.py is).",
        f"- Training: recipe `{res['recipe']}`, {res['steps']} optimizer steps x batch {res['batch_size']} of "
        f"{res['train_examples']} examples, prompt masked, the same data and seed for every method. GPTQ+LoRA: rank 16, "
        "AdamW at the paper's task learning rate 5e-4. LoTA-QAF: rank 64, omega 0.875 r = 56, t-SignSGD. GPTQ group size "
        + ", ".join(f"INT{b} g{g}" for b, g in res["group_size"].items()) + ".",
        "- LoTA-QAF is the merged model loaded from its checkpoint; its adapter model was scored too (below).", "",
        "| Bit | Method | exact match (%) | MR form (%) | right function (%) | fine-tuned | train time |",
        "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        bit = "16" if r["method"] == "base" else (f"{r['bits']}+16" if r["method"] == "lora" else str(r["bits"]))
        tuned = "no" if r["method"] in ("base", "gptq") else f"{r['steps']} steps"
        t = f"{r['train_seconds']:.0f} s" if "train_seconds" in r else ""
        n = len(r["samples"])
        form = sum(bool(MR_FORM.match(s["generated"])) for s in r["samples"]) / n
        fn = sum(s["generated"].split("(")[0] == s["target"].split("(")[0] for s in r["samples"]) / n
        lines.append(f"| {bit} | {r['label']} | {100 * r['exact_match']:.1f} | {100 * form:.0f} | {100 * fn:.0f} | "
                     f"{tuned} | {t} |")
    lines += ["", "Merge checks (LoTA-QAF adapter model vs the merged checkpoint, on every test item):", ""]
    for c in res["merge_checks"]:
        lines.append(f"- INT{c['bits']}: {c['same_text']}/{c['items']} identical generations, exact match "
                     f"{100 * c['adapter_exact_match']:.1f}% vs {100 * c['merged_exact_match']:.1f}%, certificate max "
                     f"|logit diff| {c['certificate_max_abs_logit_diff']:g}")
    lines += ["", "A few generations of the last LoTA-QAF row (target -> generated):", ""]
    last = [r for r in res["rows"] if r["method"] == "lota"][-1:]
    for s in (last[0]["samples"][:4] if last else []):
        lines.append(f"- `{s['target']}` -> `{s['generated'][:200]}` ({'match' if s['exact_match'] else 'no match'})")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    torch.set_num_threads(os.cpu_count() or 1)
    args = parse_args(argv)
    if args.render:
        res = json.loads(Path(args.render).read_text())
        write_text_atomic(Path(args.out).with_suffix(".md"), markdown(res))
        return 0
    res = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out.with_suffix(".json"), res)
    write_text_atomic(out.with_suffix(".md"), markdown(res))
    print(markdown(res))  # plain: rich would read the attribute values' [brackets] as markup
    bad = [c for c in res["merge_checks"] if not c["ok"]]
    if bad:
        print(f"task_specific: the merged LoTA-QAF model differs from its adapter model: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
