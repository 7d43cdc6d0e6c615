"""LoTA-QAF beside the methods users pick instead, on SmolLM2-135M-Instruct (embedded), offline, on this machine.

    python scripts/reproduce.py                    # the committed table (docs/results/smollm2.md has its time)
    python scripts/reproduce.py --render docs/results/smollm2.json --engines PY   # add "exact in" (engine checks)
    python scripts/reproduce.py --quick           # INT2 on a small subset, a few minutes (run by `make test`)
    python scripts/reproduce.py --check           # rerun the committed table's settings; exit 1 naming the rows that moved
    python scripts/reproduce.py --quick --check   # the same for docs/results/smollm2_quick.json (`make test` checks it)

For every bit width: one GPTQ base (the recipe's quantizer, cached under <root>/_cache), then every method
trained on it with the same shipped self-distilled data, steps, batch and seed: GPTQ + LoRA, QA-LoRA, LoTA-QAF,
LoTA-QAF integer-only (no offset factor), scales (PEQA / E2E-QP), zeros, scales+zeros and, at 4 bits, QLoRA
(its own NF4 base). Each method sweeps its one knob over three values (SWEEP) at every width (or at the
--sweep-bits widths, the others reusing the first one's choice) and keeps the value with the lowest perplexity
on a validation slice (the last quarter of the calibration windows: neither training data nor held-out text).
A learning rate chosen at one width does not carry to another: scales and zero points are trained in weight
units, and a 4-bit step size is ~5x smaller than a 2-bit one (docs/decisions.md). The chosen run of an exact kind
is merged (with its certificate) and its MERGED checkpoint, loaded as a user loads it, is the row; it must
score exactly what its adapter model scored, or the script fails. LoRA-type rows are the adapter model, with
their lossy merge measured. Every model is scored on the same held-out windows (and on MMLU with --mmlu,
the default with --quick). Finished runs are reused (<root>/reproduce/<settings>/), so an interrupted
reproduction resumes. --engines runs the exports of each artifact class in the engines that serve them and
fills the "exact in" column (:func:`engine_checks`).

Writes <out>.md (the table, the exact command), <out>.json (everything measured) and <out>.png (chart),
each through a temporary file.

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
import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from report import pyplot, save_figure, write_results  # scripts/ is on sys.path when a script runs

from lotaqaf_cli import precision, ui
from lotaqaf_cli.chain import run_step
from lotaqaf_cli.config import compose, validate
from lotaqaf_cli.core import nf4
from lotaqaf_cli.core.perplexity import perplexity
from lotaqaf_cli.core.qlinear import quantized_modules
from lotaqaf_cli.data import mmlu
from lotaqaf_cli.eval.mmlu import evaluate_mmlu
from lotaqaf_cli.io.adapter import adapter_layers
from lotaqaf_cli.io.files import write_json_atomic, write_text_atomic
from lotaqaf_cli.io.rundir import RunDir
from lotaqaf_cli.session import Session

RECIPE = "smollm2_mmlu"
GROUP_SIZE = {4: 64, 3: 64, 2: 32}        # INT2 uses g32 (issue 3's setting); the paper uses g64 throughout
# trained on the same base and data; qlora (its own NF4 base) at 4 bits only
METHODS = ("lora", "qalora", "lota", "lota_int", "scales", "zeros", "scales_zeros", "qlora")
QUICK_METHODS = ("lora", "qalora", "lota", "lota_int", "scales", "zeros")   # one new row per kind
LABELS = {"base": "base", "gptq": "GPTQ", "nf4": "NF4", "lora": "GPTQ+LoRA", "qalora": "QA-LoRA",
          "lota": "LoTA-QAF", "lota_int": "LoTA-QAF integer-only", "scales": "scales (PEQA)",
          "zeros": "zeros", "scales_zeros": "scales+zeros", "qlora": "QLoRA (NF4+LoRA)"}
# lota_int: LoTA-QAF without the offset factor, so its merge is a plain integer-zero GPTQ checkpoint
# that any GPTQ engine serves exactly; the row shows what that compatibility costs.
ADAPTER = {"lora": ["adapter=lora"], "qalora": ["adapter=qalora"], "lota": ["adapter=lota"],
           "lota_int": ["adapter=lota", "adapter.offset_granularity=none"], "scales": ["adapter=scales"],
           "zeros": ["adapter=zeros"], "scales_zeros": ["adapter=zeros", "adapter.train=[scales,zeros]"],
           "qlora": ["quant=nf4", "adapter=lora"]}
EXACT = ("lota", "lota_int", "scales", "zeros", "scales_zeros")   # merged bit-exactly: the row is the merged model
BIT_LABELS = {"lora": "{b}+16", "qlora": "NF4+16"}
# The sweep every method gets: three values of its one knob around its paper's setting (AdamW's learning rate:
# QLoRA's 2e-4 for LoRA-type adapters, PEQA/E2E-QP's small rates for the quantization parameters, which move in
# weight units; t-SignSGD has no learning rate: LoTA-QAF's knob is omega, 0.75 r = 48 in the paper's setting).
LORA_LRS, QPARAM_LRS, OMEGAS = (1e-4, 3e-4, 1e-3), (3e-5, 1e-4, 3e-4), (40, 48, 56)
SWEEP = {"lora": ("optim.lr", LORA_LRS), "qalora": ("optim.lr", LORA_LRS), "qlora": ("optim.lr", LORA_LRS),
         "scales": ("optim.lr", QPARAM_LRS), "zeros": ("optim.lr", QPARAM_LRS), "scales_zeros": ("optim.lr", QPARAM_LRS),
         "lota": ("adapter.omega", OMEGAS), "lota_int": ("adapter.omega", OMEGAS)}
VAL_FRACTION = 4   # the validation slice: the last quarter of the calibration windows (8 of the shipped 32)
# --quick: two subjects (humanities, STEM), small data; sized to finish in a few minutes on 2 cores.
QUICK_SUBJECTS = ("philosophy", "elementary_mathematics")
# --check: a perplexity may move this much (relative), an MMLU average this many standard errors
PPL_TOL, ACC_SE = 0.02, 2.0
DEFAULT_OUT = "docs/results/smollm2"
SETTING_FLAGS = ("quick", "bits", "steps", "limit", "subjects", "seed", "precision", "mmlu", "sweep_bits",
                 "methods")  # what changes the numbers
QUICK_OVERRIDES = ["calib.n_samples=4", "calib.seq_len=128", "ppl.n_samples=4", "ppl.seq_len=128",
                   "data.n_samples=16", "data.target_len=64"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=None, help="bit widths (default 2 3 4; --quick: 2)")
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                   help="trained rows (default all; --quick: " + " ".join(QUICK_METHODS) + ")")
    p.add_argument("--sweep-bits", type=int, nargs="*", default=None,
                   help="the widths whose rows sweep their knob on the validation slice (default: every width; "
                        "--quick: none); the other widths take the value the first swept width chose")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per method (default: the recipe's 40; --quick 6)")
    p.add_argument("--mmlu", action=argparse.BooleanOptionalAction, default=None,
                   help="score MMLU too (default: with --quick only; ~2.5 min a model on 2 cores at the full subset)")
    p.add_argument("--limit", type=int, default=None, help="MMLU questions per subject (default 5)")
    p.add_argument("--subjects", nargs="+", default=None, help="MMLU subjects (default all 57; --quick 2)")
    p.add_argument("--quick", action="store_true", help="INT2, small data and subset: a few minutes")
    p.add_argument("--root", default="runs", help="runs root (its _cache is shared with `lotaqaf train`; finished "
                   "runs under <root>/reproduce/<settings> are reused, so an interrupted reproduction resumes)")
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
    p.add_argument("--engines", metavar="PYTHON", nargs="?", const="", default=None,
                   help="after the rows, run the exports of each artifact class in the engines that serve them "
                        "(`lotaqaf export`'s check; PYTHON: an interpreter with gptqmodel, peft, llama-cpp-python)")
    p.add_argument("--engine-bits", type=int, nargs="+", default=None,
                   help="--engines: check these widths only (default every width); the others say 'not checked'")
    p.add_argument("--render", metavar="JSON", help="only rewrite <out>.md and .png from a results JSON of this script")
    return p.parse_args(argv)


def settings_from(args) -> dict:
    quick = args.quick
    bits = args.bits or ([2] if quick else [2, 3, 4])
    mmlu_on = quick if args.mmlu is None else args.mmlu
    return {"bits": bits,
            "methods": list(args.methods or (QUICK_METHODS if quick else METHODS)),
            "sweep_bits": [] if quick and args.sweep_bits is None else
                          (bits if args.sweep_bits is None else [b for b in args.sweep_bits if b in bits]),
            "steps": args.steps or (6 if quick else 40),
            "mmlu": mmlu_on,
            "limit": (args.limit or 5) if mmlu_on else None,
            "subjects": sorted(args.subjects or (QUICK_SUBJECTS if quick else mmlu.SUBJECTS)) if mmlu_on else [],
            "overrides": (list(QUICK_OVERRIDES) if quick else []) + [f"precision={args.precision or 'auto'}"],
            "seed": args.seed or 0}


def settings_key(s: dict) -> str:
    """A short name for the settings that shape a trained run (its folder under <root>/reproduce/)."""
    shaping = {k: s[k] for k in ("steps", "overrides", "seed")}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:10]


def run_config(bits: int, method: str, s: dict, root: Path, value=None):
    knob = [f"{SWEEP[method][0]}={value}"] if value is not None else []
    run_dir = root / "reproduce" / settings_key(s) / f"int{bits}_{method}_{'default' if value is None else value}"
    ov = [f"recipe={RECIPE}", f"quant.bits={bits}", f"quant.group_size={GROUP_SIZE[bits]}", *ADAPTER[method], *knob,
          f"optim.steps={s['steps']}", f"optim.save_every={s['steps']}", f"seed={s['seed']}",
          f"run.root={root}", f"run.dir={run_dir}", *s["overrides"]]
    cfg = compose(ov)
    validate(cfg)
    return cfg


def score(model, tok, windows, s: dict, val=None) -> dict:
    """Held-out perplexity (and on the validation windows, and MMLU when the settings score it) of one model."""
    model.eval()
    out = {}
    with torch.no_grad():
        if s["mmlu"]:
            out["mmlu"] = evaluate_mmlu(model, tok, source="offline", num_fewshot=5, limit=s["limit"], engine="fast",
                                        subjects=s["subjects"], return_predictions=True)
        out["ppl"], out["ppl_tokens"] = perplexity(model, windows)
        if val is not None:
            out["val_ppl"], _ = perplexity(model, val)
    return out


def row(method: str, bits, r: dict, extra: dict | None = None) -> dict:
    out = {"method": method, "bits": bits, "label": LABELS[method],
           "bit_label": BIT_LABELS.get(method, "{b}").format(b=bits), "ppl": r["ppl"], "ppl_tokens": r["ppl_tokens"]}
    if "mmlu" in r:
        m = r["mmlu"]
        out.update(categories={c: m["categories"].get(c, {}).get("acc") for c in mmlu.CATEGORIES},
                   avg=m["average"]["acc"], n_questions=m["average"]["n"], mmlu_seconds=m["seconds"])
    out.update(extra or {})
    return out


def trainable_params(model) -> int:
    return sum(p.numel() for m in adapter_layers(model).values() for p in m.parameters(recurse=False))


def bits_per_weight(method: str, bits: int, shapes: list[tuple[int, int]], params: int) -> float:
    """Bits a quantized weight of the deployable artifact, over the adapted linears: the codes, per group an
    fp16 scale and a zero point (GPTQ's packed integer one, or a float32 fractional one: LoTA-QAF, zeros,
    QA-LoRA's merge), NF4's 4 bits + its double-quantized absmax, and a 16-bit LoRA's ``params`` beside the base."""
    n = sum(a * b for a, b in shapes)
    if method == "base":
        return 16.0
    if method in ("nf4", "qlora"):
        return nf4.nf4_bits_per_weight() + (16 * params / n if method == "qlora" else 0.0)
    g = GROUP_SIZE[bits]
    float_zero = method in ("lota", "zeros", "scales_zeros", "qalora")
    per_group = 16 + (32 if float_zero else bits)
    return bits + per_group / g + (16 * params / n if method == "lora" else 0.0)


def recovery(ppl: float, base_ppl: float, ppl16: float) -> float:
    """The fraction of the log-perplexity gap to the 16-bit model closed: 0 the quantized base, 1 the 16-bit model."""
    return (math.log(base_ppl) - math.log(ppl)) / (math.log(base_ppl) - math.log(ppl16))


class Runner:
    """One reproduction: the shared source, held-out and validation windows, and each trained run's scores
    (read back from its run directory when an earlier reproduction finished it)."""

    def __init__(self, args, source=None):
        self.s, self.root, self.source = settings_from(args), Path(args.root), source
        self.windows = self.val = self.heldout_hash = self.ses = None

    def session(self, cfg) -> Session:
        torch.manual_seed(cfg.seed)
        self.ses = Session(cfg, RunDir.for_config(cfg), source=self.source)
        return self.ses

    def quantized_base(self, bits: int, method: str) -> tuple[Session, list[dict]]:
        """The width's quantized base (GPTQ, or NF4 for qlora) in a session, and the rows it adds: the 16-bit
        model once, then the base itself."""
        ses = self.session(run_config(bits, method, self.s, self.root))
        run_step(ses, "quantize")
        self.source, rows = ses.source, []
        if self.windows is None:  # the same held-out and validation windows for every model
            self.windows, self.heldout_hash = ses.windows_for("heldout", ses.cfg.ppl)
            calib, _ = ses.windows_for("calib", ses.cfg.calib)
            self.val = calib[-max(1, len(calib) // VAL_FRACTION):]
            ui.say("[bold]== 16-bit ==[/bold]")
            rows.append(row("base", 16, score(precision.cast_copy(self.source.model, ses.precision.dtype),
                                              self.source.tokenizer, self.windows, self.s), {"params": 0}))
        return ses, rows

    def trial(self, bits: int, method: str, value) -> dict:
        """Train one run (or read the one an earlier reproduction finished) and score its adapter model."""
        cfg = run_config(bits, method, self.s, self.root, value)
        done = Path(cfg.run.dir) / "reproduce_trial.json"
        if done.is_file():
            return json.loads(done.read_text())
        ses = self.session(cfg)
        ui.say(f"[bold]== INT{bits}: {LABELS[method]}" + (f", {SWEEP[method][0]}={value}" if value is not None else "")
               + " ==[/bold]")
        run_step(ses, "train")
        scores = score(ses.adapted, self.source.tokenizer, self.windows, self.s, self.val)
        shapes = [(m.base.in_features, m.base.out_features) for m in adapter_layers(ses.adapted).values()]
        out = {"value": value, "run": str(ses.run.path), "scores": scores, "train_seconds": ses.timings["train_s"],
               "params": trainable_params(ses.adapted), "shapes": shapes}
        write_json_atomic(done, out)
        self.ses = None
        return out

    def finish(self, bits: int, method: str, best: dict) -> tuple[dict, dict | None]:
        """The chosen run's row: for an exact kind its merged checkpoint scored (and held to its adapter model),
        for LoRA-type kinds the adapter model with its lossy merge measured."""
        ses = self.session(run_config(bits, method, self.s, self.root, best["value"]))
        ui.say(f"[bold]== INT{bits}: {LABELS[method]}: merge ==[/bold]")
        run_step(ses, "merge")
        cert = ses.run.read_record("merge_certificate")
        extra = {"train_seconds": best["train_seconds"], "run": best["run"], "params": best["params"],
                 "chosen": None if best["value"] is None else f"{SWEEP[method][0].split('.')[-1]} {best['value']:g}",
                 "val_ppl": best["scores"].get("val_ppl"),
                 "bpw": bits_per_weight(method, bits, best["shapes"], best["params"]),
                 "certificate_max_abs_logit_diff": cert["max_abs_logit_diff"]}
        adapter_scores = best["scores"]
        if method not in EXACT:
            extra["lossy_merge_ppl"] = cert.get("perplexity", {}).get("merged")
            return row(method, bits, adapter_scores, extra), None
        merged_model, _, merged_info = ses.run.load_merged()  # the written checkpoint, as a user loads it
        ses.place(merged_model)
        merged_scores = score(merged_model, self.source.tokenizer, self.windows, self.s)
        check = {"method": method, **merged_equals_adapter(bits, adapter_scores, merged_scores, cert)}
        extra.update(checkpoint_format=merged_info["quantize_config"]["checkpoint_format"],
                     adapter_ppl=adapter_scores["ppl"])
        if method.startswith("lota"):
            changed = ses.run.read_record("train")["codes_changed"]["codes"]
            extra.update(codes_up=changed["up_frac"], codes_down=changed["down_frac"],
                         codes_changed=changed["up_frac"] + changed["down_frac"])
        if "mmlu" in adapter_scores:
            extra["adapter_avg"] = adapter_scores["mmlu"]["average"]["acc"]
        del merged_model
        self.ses = None
        return row(method, bits, merged_scores, extra), check


def reproduce(args, source=None) -> dict:
    """Run every row; ``source`` is an already loaded embedded model (LoadedModel) to reuse."""
    run = Runner(args, source)
    s = run.s
    t_all = time.time()
    rows, checks, chosen, sweeps = [], [], {}, []
    for bits in s["bits"]:
        methods = [m for m in s["methods"] if m != "qlora" or bits == 4]
        ui.say(f"[bold]== INT{bits} g{GROUP_SIZE[bits]}: GPTQ ==[/bold]")
        ses, base_rows = run.quantized_base(bits, methods[0] if methods[0] != "qlora" else "lora")
        rows += base_rows
        base_row = row("gptq", bits, score(ses.base, run.source.tokenizer, run.windows, s), {"params": 0})
        base_row["bpw"] = bits_per_weight("gptq", bits, [(m.in_features, m.out_features)
                                                          for m in quantized_modules(ses.base).values()], 0)
        rows.append(base_row)
        run.ses = ses = None
        for method in methods:
            if method == "qlora":
                nf4_ses, _ = run.quantized_base(bits, "qlora")
                nf4_row = row("nf4", bits, score(nf4_ses.base, run.source.tokenizer, run.windows, s), {"params": 0})
                nf4_row.update(bit_label="NF4", bpw=bits_per_weight("nf4", bits, [], 0))
                rows.append(nf4_row)
                run.ses = None
            # swept at the --sweep-bits widths, and at its first width a method that none of them has (QLoRA)
            if bits in s["sweep_bits"] or (s["sweep_bits"] and method not in chosen):
                values = SWEEP[method][1]
            else:
                values = [chosen.get(method)]
            trials = [run.trial(bits, method, v) for v in values]
            best = min(trials, key=lambda t: t["scores"]["val_ppl"])
            if len(trials) > 1:
                chosen.setdefault(method, best["value"])
                sweeps.append({"method": method, "bits": bits, "knob": SWEEP[method][0], "chosen": best["value"],
                               "trials": [{"value": t["value"], "val_ppl": t["scores"]["val_ppl"],
                                           "ppl": t["scores"]["ppl"], "run": t["run"]} for t in trials]})
            r, check = run.finish(bits, method, best)
            rows.append(r)
            if check is not None:
                checks.append(check)
    ppl16 = next(r["ppl"] for r in rows if r["method"] == "base")
    for r in rows:
        if r["method"] != "base":
            base = next(b for b in rows if b["bits"] == r["bits"] and b["method"] == ("nf4" if r["method"] in ("qlora", "nf4") else "gptq"))
            r["recovery"] = recovery(r["ppl"], base["ppl"], ppl16)
    out = {"settings": {**s, "group_size": {b: GROUP_SIZE[b] for b in s["bits"]}, "recipe": RECIPE,
                        "quick": args.quick, "mmlu_source": "offline", "engine": "fast", "num_fewshot": 5,
                        "ppl_windows": list(run.windows.shape), "val_windows": list(run.val.shape),
                        "heldout_hash": run.heldout_hash, "precision": precision.resolve(
                            (s["overrides"][-1]).split("=")[1], torch.device("cpu")).name},
           "command": command_line(args), "rows": rows, "merge_checks": checks, "sweeps": sweeps,
           "train_timing": "loop", "data_note": mmlu.OFFLINE_NOTE, "seconds": round(time.time() - t_all, 1),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads, torch {torch.__version__}",
           "date": time.strftime("%Y-%m-%d")}
    return out


def merged_equals_adapter(bits: int, adapter: dict, merged: dict, cert: dict) -> dict:
    """The merged model scores exactly what its adapter model scored: perplexity, certificate and, when MMLU
    is scored, every prediction."""
    out = {"bits": bits, "adapter_ppl": adapter["ppl"], "merged_ppl": merged["ppl"],
           "certificate_max_abs_logit_diff": cert["max_abs_logit_diff"]}
    same = n = 0
    if "mmlu" in adapter:
        pa, pm = adapter["mmlu"]["predictions"], merged["mmlu"]["predictions"]
        n = sum(len(v) for v in pa.values())
        same = sum(a == b for k in pa for a, b in zip(pa[k], pm[k], strict=True))
        out.update(adapter_avg=adapter["mmlu"]["average"]["acc"], merged_avg=merged["mmlu"]["average"]["acc"])
    out.update(questions=n, same_predictions=same,
               ok=same == n and adapter["ppl"] == merged["ppl"] and cert["max_abs_logit_diff"] == 0.0)
    return out


# The artifact classes whose exports are run in the engines (`lotaqaf export --format F`, its engine check):
# integer zero points (a plain GPTQ checkpoint) and fractional ones; one row of each per width is checked, and
# the rows of its class take its result (an export's exactness depends on the class and the width, not on the
# trained values). LoRA and QA-LoRA rows are checked on their own runs, unmerged: the GPTQ base + the adapter as a
# PEFT LoRA (`export.source=adapter`), the artifact those rows deploy.
ENGINE_CLASSES = {"scales": ("scales", "lota_int"), "lota": ("lota", "zeros", "scales_zeros")}
ENGINE_FORMATS = {2: ("gptq", "torchao"), 3: ("gptq", "torchao"), 4: ("gptq", "torchao", "gguf")}  # GGUF: exact
# only where its Q4_1 blocks hold the codes' own precision (docs/formats.md: not at 2 and 3 bits in llama.cpp)


def engine_checks(res: dict, python: str | None, widths: list[int] | None = None) -> None:
    """Fill each row's `exact_in` from `lotaqaf export` runs (the engines whose greedy continuations equal
    lotaqaf's on every probe prompt), in place; rows of other ``widths`` say they were not checked."""
    by = {(r["method"], r["bits"]): r for r in res["rows"]}
    checked = []
    for (method, bits), r in by.items():
        if method in ("base", "gptq", "nf4"):
            continue
        if widths is not None and bits not in widths:
            r.setdefault("exact_in", "not checked")
            continue
        if method == "lora":  # deploys unmerged: the GPTQ base + the LoRA in PEFT
            if "engine_results" not in r:
                r["engine_results"] = {"gptq": _export_check(Path(r["run"]), "gptq", python, adapter=True)}
                checked.append(f"INT{bits} {LABELS[method]} (base + LoRA)")
            src = r
        elif method == "qalora":  # deploys merged into fractional zero points: its own merged checkpoint
            if "engine_results" not in r:
                r["engine_results"] = {f: _export_check(Path(r["run"]), f, python) for f in ENGINE_FORMATS[bits]}
                checked.append(f"INT{bits} {LABELS[method]} (merged)")
            src = r
        elif method == "qlora":  # deploys unmerged: NF4 (bitsandbytes, at load) + the LoRA in PEFT
            if "engine_results" not in r:
                r["engine_results"] = {"hf16": _export_check(Path(r["run"]), "hf16", python, adapter=True)}
                checked.append(f"{LABELS[method]} (NF4 + LoRA)")
            src = r
        else:
            rep = next((k for k, members in ENGINE_CLASSES.items() if method in members), None)
            src = by.get((rep, bits)) if rep else None
            if src is None or "run" not in src:
                continue
            if "engine_results" not in src:
                src["engine_results"] = {f: _export_check(Path(src["run"]), f, python) for f in ENGINE_FORMATS[bits]}
                checked.append(f"INT{bits} {LABELS[rep]}")
            if method != rep:
                r["exact_in_from"] = f"INT{bits} {LABELS[rep]}"
        r["exact_in"] = sorted({f"{eng} ({fmt})" for fmt, got in src["engine_results"].items()
                                for eng, e in (got or {}).items()
                                if e.get("checked") and e["same_continuations"] == e["prompts"]}) or "none"
    if checked:
        res["exact_in_note"] = (
            "the engines whose greedy continuations (8 prompts x 32 tokens) equal lotaqaf's on every prompt, "
            "running the row's export (`lotaqaf export --format gptq|torchao`, and gguf at INT4, with its engine check; "
            "GPTQ+LoRA `--format gptq export.source=adapter`: the GPTQ base + the LoRA in PEFT, unmerged; QLoRA "
            "`--format hf16 export.source=adapter`: transformers quantizing to NF4 as it loads + PEFT; QA-LoRA its "
            "merge into fractional zero points, so exact means: serves what lotaqaf's merged model computes). Exports were "
            "run for " + ", ".join(checked) + "; the other rows of an artifact class (integer or fractional zero "
            "points) take the result of their width's checked row.")


def _export_check(run: Path, fmt: str, python: str | None, adapter: bool = False) -> dict | None:
    """`lotaqaf export run=RUN --format FMT` (reused when its record exists): {engine: its check}."""
    record = run / f"export-{fmt}{'-adapter' if adapter else ''}.json"
    if not record.is_file():
        cmd = [sys.executable, "-m", "lotaqaf_cli", "export", f"run={run}", "--format", fmt]
        cmd += ["export.source=adapter"] if adapter else []
        cmd += [f"export.check_python={python}"] if python else []
        ui.say("$ " + " ".join(cmd))
        if subprocess.run(cmd).returncode != 0 or not record.is_file():
            return None
    return json.loads(record.read_text()).get("engines", {})


def command_line(args) -> str:
    parts = ["python scripts/reproduce.py"]
    if args.quick:
        parts.append("--quick")
    for flag in ("bits", "methods", "sweep_bits", "steps", "limit", "subjects"):
        v = getattr(args, flag, None)
        if v is not None and (v or flag == "sweep_bits"):
            parts.append(f"--{flag.replace('_', '-')} " + " ".join(map(str, v if isinstance(v, list) else [v])))
    if getattr(args, "mmlu", None) is not None:
        parts.append("--mmlu" if args.mmlu else "--no-mmlu")
    if getattr(args, "precision", None) not in (None, "auto"):
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
        if "avg" not in want:  # MMLU not scored
            continue
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


def _fmt(x, spec: str, empty: str = "") -> str:
    return empty if x is None else format(x, spec)


def markdown(res: dict) -> str:
    s = res["settings"]
    has_mmlu = s.get("mmlu", True) and "avg" in res["rows"][0]
    lines = [
        "# SmolLM2-135M-Instruct: LoTA-QAF beside the methods users pick instead", "",
        f"Produced by `{res['command']}` on {res['date']} ({res['machine']}; {res['seconds'] / 60:.1f} min in all).", "",
        *([res["note"], ""] if res.get("note") else []),  # e.g. how a resumed reproduction was run
        f"- Held-out perplexity: {s['ppl_windows'][0]} windows x {s['ppl_windows'][1]} tokens of text the 16-bit "
        "model wrote for held-out prompts (never used for calibration or training). recovery = (log ppl_base - "
        "log ppl) / (log ppl_base - log ppl_16bit), the base being the width's GPTQ model (NF4 for QLoRA): 0 is "
        "the quantized base, 1 the 16-bit model.",
        f"- Every trained row: recipe `{RECIPE}`, {s['steps']} optimizer steps, batch 4, the same shipped "
        f"self-distilled data and seed {s['seed']}; GPTQ group size " +
        ", ".join(f"INT{b} g{g}" for b, g in s["group_size"].items()) +
        (f"; extra overrides: {' '.join(s['overrides'])}" if s["overrides"] else "") + ".",
    ]
    if res.get("sweeps"):
        val = s.get("val_windows", ["?", "?"])
        swept = sorted({sw["bits"] for sw in res["sweeps"]})
        lines.append(
            f"- Tuning, the same for every method: three values of its one knob (AdamW's learning rate; omega for "
            f"LoTA-QAF, whose t-SignSGD has no learning rate), chosen by the perplexity on a validation slice: the "
            f"last {val[0]} x {val[1]} tokens of the calibration windows, neither training data nor held-out text. "
            f"Swept at " + ", ".join(f"INT{b}" for b in swept) +
            ("; the other widths use the value chosen there." if set(swept) != set(s["bits"]) else "."))
    lines += [
        "- The row of an exact kind (LoTA-QAF, integer-only, scales, zeros, scales+zeros) is its MERGED "
        "checkpoint, scored as a user loads it; its adapter model scored the same perplexity to the last bit and "
        "its merge certificate is 0 (checked by the script). LoRA-type rows are the adapter model; their merge "
        "re-quantizes (lossy merge column).",
        "- bits/weight: of the deployable artifact, over the adapted linears: the codes, per group an fp16 scale "
        "and a zero point (GPTQ's packed integer one, or a float32 fractional one), NF4's 4 bits with its "
        "double-quantized absmax, plus a 16-bit LoRA beside the base.",
    ]
    if res.get("exact_in_note"):
        lines.append("- exact in: " + res["exact_in_note"])
    lines.append("")
    head = ["Bit", "Method", "held-out ppl", "recovery", "trainable", "train s", "chosen", "bits/weight",
            "lossy merge ppl", "exact in"]
    if has_mmlu:
        head[2:2] = ["MMLU avg"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["rows"]:
        cells = [r["bit_label"], r["label"], f"{r['ppl']:.3f}", _fmt(r.get("recovery"), ".3f"),
                 f"{r.get('params', 0):,}" if r.get("params") else "", _fmt(r.get("train_seconds"), ".0f"),
                 r.get("chosen") or "", _fmt(r.get("bpw"), ".2f"), _fmt(r.get("lossy_merge_ppl"), ".3f"),
                 ", ".join(r.get("exact_in", [])) if isinstance(r.get("exact_in"), list) else (r.get("exact_in") or "")]
        if has_mmlu:
            cells[2:2] = [_pct(r.get("avg"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Merge checks (adapter model vs merged model, exact kinds):", ""]
    for c in res["merge_checks"]:
        lines.append(f"- INT{c['bits']} {LABELS[c.get('method', 'lota')]}: "
                     + (f"{c['same_predictions']}/{c['questions']} identical MMLU predictions, " if c.get("questions") else "")
                     + f"perplexity {c['adapter_ppl']:.6f} vs {c['merged_ppl']:.6f}, certificate max |logit diff| "
                     f"{c['certificate_max_abs_logit_diff']:g}")
    if res.get("sweeps"):
        lines += ["", "The sweeps (validation perplexity; held-out perplexity beside it):", ""]
        for sw in res["sweeps"]:
            trials = "; ".join(f"{t['value']:g}: {t['val_ppl']:.3f} ({t['ppl']:.3f})" for t in sw["trials"])
            lines.append(f"- INT{sw['bits']} {LABELS[sw['method']]}, {sw['knob']}: {trials}; chosen {sw['chosen']:g}")
    lines += ["", "train s: wall-clock time of the training loop on this machine.", ""]
    return "\n".join(lines)


def chart(res: dict, path: Path) -> None:
    """Held-out perplexity per width and method (log scale), with the 16-bit model's."""
    plt = pyplot()
    rows = [r for r in res["rows"] if r["method"] != "base"]
    bits = list(res["settings"]["bits"])
    methods = [m for m in ("gptq", "nf4", *METHODS) if any(r["method"] == m for r in rows)]
    base = next(r for r in res["rows"] if r["method"] == "base")
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.85 / len(methods)
    for k, m in enumerate(methods):
        pts = [(i, r["ppl"]) for i, b in enumerate(bits) for r in rows if r["method"] == m and r["bits"] == b]
        ax.bar([i + (k - (len(methods) - 1) / 2) * width for i, _ in pts], [p for _, p in pts], width, label=LABELS[m])
    ax.axhline(base["ppl"], color="k", ls="--", lw=1, label="16-bit")
    ax.set_yscale("log")
    ax.set_xticks(range(len(bits)), [f"INT{b}" for b in bits])
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.legend(fontsize=7, ncol=2)
    fig.suptitle("SmolLM2-135M-Instruct: held-out perplexity by method and width (lower is better)")
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
        if args.engines is not None:  # the engine checks added to an earlier run's results
            engine_checks(res, args.engines or None, args.engine_bits)
            write_outputs(res, args.out)
            return 0
        write_text_atomic(Path(args.out).with_suffix(".md"), markdown(res))
        chart(res, Path(args.out).with_suffix(".png"))
        return 0
    if args.results:
        res = json.loads(Path(args.results).read_text())
    else:
        res = reproduce(args)
        if args.engines is not None:
            engine_checks(res, args.engines or None, args.engine_bits)
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
