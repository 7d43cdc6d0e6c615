"""Which part of LoTA-QAF does the work: ablations on SmolLM2-135M at INT2 g32 and INT3 g64.

    python scripts/ablate.py                      # every variant at INT3 and INT2 (~1 hour on 2 cores)
    python scripts/ablate.py --bits 2 --variants full offset_only --steps 10      # a quick look
    python scripts/ablate.py --render docs/results/ablation.json                 # only rewrite .md/.png

Every variant trains on the same quantized base (one per width, cached under <root>/_cache), the
same shipped self-distilled data, the same seed and the same number of t-SignSGD steps as recipe
smollm2_mmlu, and is scored on the same shipped held-out windows. Variants:

- full:          the recipe (r 64, omega 48 = 0.75 r, offset factor per group, reference schedule)
- offset_only:   markers disabled (W_hat = 0 in forward and merge; adapter.markers=false)
- markers_only:  no offset factor (adapter.offset_granularity=none): the merged model is a plain
                 integer-zero GPTQ checkpoint
- omega_<f>:     omega = f * r at r 64, f in 0.5, 0.25, 0.125 (0.75 is "full")
- rank_<r>:      rank 16 or 32 at omega = 0.75 r (64 is "full")
- paper_schedule: optim.schedule=paper (fixed 0.01% over the last 20% of steps) instead of reference

Reported per variant: held-out perplexity of the adapted model (its merge is exact: see
scripts/reproduce.py and the merge certificate), the recovery fraction in log-perplexity
(log ppl_gptq - log ppl) / (log ppl_gptq - log ppl_16bit), the fraction of integer codes the
markers change, the fraction of markers the boundary blocked, the fraction of weights whose |dW|
crosses omega (also for offset_only, where they are not applied), and the train-loop time.
Writes <out>.json, <out>.md and <out>.png, each through a temporary file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from report import pyplot, save_figure, write_results  # scripts/ is on sys.path when a script runs

from lotaqaf_cli import precision, ui
from lotaqaf_cli.chain import run_step
from lotaqaf_cli.config import compose, validate
from lotaqaf_cli.core.perplexity import perplexity
from lotaqaf_cli.core.ternary import TernaryLinear
from lotaqaf_cli.io.models import load_model
from lotaqaf_cli.io.rundir import RunDir
from lotaqaf_cli.session import Session, pick_device

RECIPE = "smollm2_mmlu"
GROUP_SIZE = {3: 64, 2: 32}
RANK = 64
VARIANTS = {  # id -> (what it changes, overrides)
    "full": ("the recipe: r 64, omega 48, offset per group, reference schedule", []),
    "offset_only": ("markers disabled: offset factor only", ["adapter.markers=false"]),
    "markers_only": ("no offset factor: markers only (plain GPTQ merge)", ["adapter.offset_granularity=none"]),
    **{f"omega_{f}": (f"omega = {f} r = {f * RANK:g}", [f"adapter.omega={f * RANK:g}"]) for f in (0.5, 0.25, 0.125)},
    **{f"rank_{r}": (f"rank {r}, omega = 0.75 r = {0.75 * r:g}", [f"adapter.rank={r}", f"adapter.omega={0.75 * r:g}"])
       for r in (16, 32)},
    "paper_schedule": ("t-SignSGD schedule: paper (fixed 0.01% over the last 20%)", ["optim.schedule=paper"]),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=[3, 2], choices=sorted(GROUP_SIZE))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the recipe's)")
    p.add_argument("--root", default="runs", help="runs root (its _cache is shared with `lotaqaf train`)")
    p.add_argument("--out", default="docs/results/ablation", help="output path without extension")
    p.add_argument("--render", metavar="JSON", help="only rewrite <out>.md and .png from a results JSON")
    p.add_argument("--note", help="a sentence to print under the command line of the report")
    p.add_argument("--collect", metavar="DIR", help="first score the finished runs of an earlier sweep "
                   "(<root>/ablate/<stamp>), then run the variants it lacks")
    return p.parse_args(argv)


def config(bits: int, variant: str, args, stamp: str):
    ov = [f"recipe={RECIPE}", f"quant.bits={bits}", f"quant.group_size={GROUP_SIZE[bits]}", f"run.root={args.root}",
          f"run.dir={args.root}/ablate/{stamp}/int{bits}_{variant}", *VARIANTS[variant][1]]
    if args.steps:
        ov.append(f"optim.steps={args.steps}")
    cfg = compose(ov)
    cfg.optim.save_every = cfg.optim.steps  # one checkpoint at the end: the sweep does not resume
    validate(cfg)
    return cfg


@torch.no_grad()
def crossing(model) -> dict:
    """Over all adapted layers: the fraction of weights with |A_T B_T| > omega (whether or not the
    markers are applied) and the largest |A_T B_T| / omega."""
    n = crossed = 0
    top = 0.0
    for m in model.modules():
        if isinstance(m, TernaryLinear):
            dW = (m.A_T.float() @ m.B_T.float()).abs()
            n += dW.numel()
            crossed += int((dW > m.omega).sum())
            top = max(top, float(dW.max()) / m.omega)
    return {"crossing_frac": crossed / max(n, 1), "max_abs_dW_over_omega": top}


def recovery(ppl: float, gptq: float, fp16: float) -> float:
    return (math.log(gptq) - math.log(ppl)) / (math.log(gptq) - math.log(fp16))


class Sweep:
    """The rows so far and what they are measured against (16-bit and per-width GPTQ perplexity on
    the same held-out windows); written out after every row, so an interrupted sweep keeps its rows."""

    def __init__(self, args):
        self.args, self.rows, self.gptq = args, [], {}
        self.fp16 = self.windows = self.heldout_hash = self.cfg = None
        self.t0 = time.time()

    @staticmethod
    def dtype(cfg) -> torch.dtype:
        """Every model is scored at the run's precision (precision.py)."""
        return precision.resolve(cfg.precision, pick_device(cfg)).dtype

    def reference(self, cfg, source_model, base_model, bits: int, windows=None, heldout_hash=None) -> None:
        if self.windows is None:
            self.windows, self.heldout_hash, self.cfg = windows, heldout_hash, cfg
            self.fp16 = perplexity(precision.cast_copy(source_model, self.dtype(cfg)).eval(), windows)[0]
            ui.say(f"16-bit held-out perplexity {self.fp16:.4f}")
        if bits not in self.gptq:
            self.gptq[bits] = perplexity(precision.cast_(base_model, self.dtype(cfg)).eval(), self.windows)[0]
            ui.say(f"GPTQ INT{bits} g{GROUP_SIZE[bits]} held-out perplexity {self.gptq[bits]:.4f}")

    def add(self, bits: int, variant: str, cfg, adapted, train_record: dict, run_path) -> None:
        ppl = perplexity(precision.cast_(adapted, self.dtype(cfg)).eval(), self.windows)[0]
        codes = train_record["codes_changed"]["codes"]
        row = {"bits": bits, "group_size": GROUP_SIZE[bits], "variant": variant, "what": VARIANTS[variant][0],
               "rank": cfg.adapter.rank, "omega": cfg.adapter.omega, "markers": cfg.adapter.markers,
               "offset_granularity": cfg.adapter.offset_granularity, "schedule": cfg.optim.schedule,
               "steps": cfg.optim.steps, "ppl": ppl, "recovery": recovery(ppl, self.gptq[bits], self.fp16),
               "codes_changed": codes["up_frac"] + codes["down_frac"], "codes_up": codes["up_frac"],
               "codes_down": codes["down_frac"], "blocked_frac": codes["blocked"] / codes["total"],
               **crossing(adapted), "train_seconds": train_record["timings"]["train_s"], "run": str(run_path)}
        ui.say(f"INT{bits} {variant}: ppl {ppl:.4f} (GPTQ {self.gptq[bits]:.4f}, 16-bit {self.fp16:.4f}), "
               f"recovery {row['recovery']:.3f}, codes changed {row['codes_changed']:.3g}, {row['train_seconds']} s")
        self.rows.append(row)
        self.rows.sort(key=lambda r: (-r["bits"], list(VARIANTS).index(r["variant"])))
        write_outputs(self.result(partial=True), self.args.out)

    def result(self, partial: bool = False) -> dict:
        cfg = self.cfg
        return {"command": command_line(self.args), "note": self.args.note, "partial": partial, "rows": self.rows,
                "fp16_ppl": self.fp16,
                "gptq_ppl": self.gptq,
                "settings": {"recipe": RECIPE, "steps": sorted({r["steps"] for r in self.rows}), "seed": cfg.seed,
                             "heldout": list(self.windows.shape), "heldout_hash": self.heldout_hash,
                             "data": f"{cfg.data.source} ({cfg.data.n_samples} examples)",
                             "precision": precision.resolve(cfg.precision, pick_device(cfg)).name},
                "seconds": round(time.time() - self.t0, 1), "date": time.strftime("%Y-%m-%d"),
                "machine": f"{platform.machine()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"}


def collect(sweep: Sweep, directory: Path, source) -> None:
    """Score the finished runs of an earlier sweep (``<dir>/int<bits>_<variant>/``) from their files:
    the adapter file on its cached base, and train.json."""
    for d in sorted(directory.glob("int*_*")):
        run = RunDir(d)
        bits_s, variant = d.name[3:].split("_", 1)
        if variant not in VARIANTS or not run.adapter_file.is_file() or not (d / "train.json").is_file():
            continue
        cfg = run.config()
        adapted, _tok, _meta, info = run.load_adapted()
        if sweep.windows is None or int(bits_s) not in sweep.gptq:
            base, _, _ = run.load_base()
            windows = run.heldout_windows(info)
            sweep.reference(cfg, source.model, base, int(bits_s), windows, "sha256:" + hashlib.sha256(
                windows.numpy().tobytes()).hexdigest())
            del base
        ui.say(f"[bold]== INT{bits_s}: {variant} (collected from {d}) ==[/bold]")
        sweep.add(int(bits_s), variant, cfg, adapted, run.read_record("train"), d)


def ablate(args) -> dict:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    sweep = Sweep(args)
    source = None
    if args.collect:
        source = load_model(compose([f"recipe={RECIPE}"]).model.path)
        collect(sweep, Path(args.collect), source)
    done = {(r["bits"], r["variant"]) for r in sweep.rows}
    for bits in args.bits:
        for variant in args.variants:
            if (bits, variant) in done:
                continue
            cfg = config(bits, variant, args, stamp)
            torch.manual_seed(cfg.seed)
            ses = Session(cfg, RunDir.for_config(cfg), source=source)
            run_step(ses, "quantize")
            source = ses.source
            windows, digest = ses.windows_for("heldout", cfg.ppl)
            sweep.reference(cfg, source.model, ses.base, bits, windows, digest)
            ui.say(f"[bold]== INT{bits}: {variant} ({VARIANTS[variant][0]}) ==[/bold]")
            run_step(ses, "train")
            sweep.add(bits, variant, cfg, ses.adapted, ses.run.read_record("train"), ses.run.path)
            del ses
    return sweep.result()


def command_line(args) -> str:
    parts = ["python scripts/ablate.py"]
    if args.bits != [3, 2]:
        parts.append("--bits " + " ".join(map(str, args.bits)))
    if args.variants != list(VARIANTS):
        parts.append("--variants " + " ".join(args.variants))
    if args.steps:
        parts.append(f"--steps {args.steps}")
    if args.collect:
        parts.append(f"--collect {args.collect}")
    return " ".join(parts)


# --------------------------------------------------------------------------- reporting

def markdown(res: dict) -> str:
    s = res["settings"]
    lines = [
        "# What does the work in LoTA-QAF: ablations on SmolLM2-135M-Instruct", "",
        f"Produced by `{res['command']}` on {res['date']} ({res['machine']}; {res['seconds'] / 60:.1f} min in all)."
        + (" **Partial: the sweep was still running.**" if res.get("partial") else ""), "",
        *([res["note"], ""] if res.get("note") else []),
        f"- Recipe `{s['recipe']}` at " + " and ".join(f"INT{b} g{GROUP_SIZE[int(b)]}" for b in res["gptq_ppl"]) +
        f", {'/'.join(map(str, s['steps']))} t-SignSGD steps, seed {s['seed']}, training data {s['data']}, one "
        f"quantized base per width; every model computed and scored at {s.get('precision', 'fp32')}.",
        f"- Held-out perplexity on {s['heldout'][0]} x {s['heldout'][1]} shipped held-out tokens "
        f"(16-bit: {res['fp16_ppl']:.4f}; GPTQ: " +
        ", ".join(f"INT{b} {p:.4f}" for b, p in res["gptq_ppl"].items()) + ").",
        "- recovery = (log ppl_GPTQ - log ppl) / (log ppl_GPTQ - log ppl_16bit): 0 is GPTQ, 1 is the 16-bit model.",
        "- codes changed: fraction of integer codes the markers move by +-1 (what the merge changes in the integer "
        "grid); blocked: markers the boundary check suppressed; |dW| > omega: weights whose ternary product "
        "crosses omega (for offset_only, those that would have moved).", "",
        "| Bits | Variant | rank | omega | offset | markers | schedule | held-out ppl | recovery | codes changed "
        "| blocked | \\|dW\\| > omega | max \\|dW\\|/omega | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(f"| INT{r['bits']} g{r['group_size']} | {r['variant']} | {r['rank']} | {r['omega']:g} | "
                     f"{r['offset_granularity']} | {'on' if r['markers'] else 'off'} | {r['schedule']} | "
                     f"{r['ppl']:.4f} | {r['recovery']:.3f} | {r['codes_changed']:.3g} | {r['blocked_frac']:.3g} | "
                     f"{r['crossing_frac']:.3g} | {r['max_abs_dW_over_omega']:.2f} | {r['train_seconds']:.0f} |")
    lines += ["", "![held-out perplexity and recovery per variant](ablation.png)", ""]
    return "\n".join(lines)


def chart(res: dict, path: Path) -> None:
    plt = pyplot()
    bits = sorted({r["bits"] for r in res["rows"]}, reverse=True)
    fig, axes = plt.subplots(1, len(bits), figsize=(5.5 * len(bits), 4), squeeze=False)
    for ax, b in zip(axes[0], bits, strict=True):
        rows = [r for r in res["rows"] if r["bits"] == b]
        vals = [max(r["recovery"], -1.0) for r in rows]  # the axis stops at -1; the value is written
        ax.barh([r["variant"] for r in rows], vals, color="tab:blue")
        for y, r in enumerate(rows):
            if r["recovery"] < -1.0:
                ax.text(-0.98, y, f"{r['recovery']:.2f} (ppl {r['ppl']:.0f})", va="center", color="white", fontsize=8)
        ax.set_xlim(-1.05, 1.05)
        ax.axvline(0, color="k", lw=1)
        ax.axvline(1, color="k", ls="--", lw=1, label="16-bit")
        ax.set_xlabel("recovery in log-perplexity (0: GPTQ, 1: 16-bit)")
        ax.set_title(f"INT{b} g{rows[0]['group_size']}")
        ax.invert_yaxis()
    fig.suptitle("SmolLM2-135M-Instruct: LoTA-QAF ablations")
    fig.tight_layout()
    save_figure(fig, path)


def write_outputs(res: dict, out: str | Path) -> dict:
    return write_results(res, out, markdown, chart)


def main(argv=None) -> int:
    torch.set_num_threads(os.cpu_count() or 1)
    args = parse_args(argv)
    if args.render:
        res = json.loads(Path(args.render).read_text())
        if args.note:
            res["note"] = args.note
    else:
        res = ablate(args)
    write_outputs(res, args.out)
    ui.say(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
