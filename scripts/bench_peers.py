"""lotaqaf against the tools users would run instead, on the same model and data, in one run.

    .venv/bin/python scripts/bench_peers.py                      # quantization: INT4 g64, INT3 g64, INT2 g32
    .venv/bin/python scripts/bench_peers.py --widths 2/32 --gptqmodel-sym false

Quantization part: SmolLM2-135M (the embedded model, dequantized to float32) with the shipped 32 x 256
calibration windows, quantized by
- lotaqaf: `quantize_model` with the default recipe's quant settings (smollm2_mmlu), in this process;
- gptqmodel: its own defaults (GPTQModel.quantize, batch size 8, float32 model) in a child process run
  by the side venv's python (gptqmodel never enters the project venv; see scripts/make_gptq_fixture.py).
  Its default grid is symmetric (sym=True); lotaqaf's is asymmetric, so both grids are run unless
  --gptqmodel-sym says one.
Both bases are then scored by the same code: lotaqaf's GPTQ reader (io/checkpoint.load_quantized; the
gptqmodel checkpoint is read from its files) and core/perplexity on the shipped 16 x 256 held-out windows.
Times are the quantization call alone (model loading and saving excluded), one run each, the runs one
after another so that they never share the 2 cores. Prints a table and the ratios lotaqaf / gptqmodel.

The side venv (about 0.7 GB):
    python3 -m venv /work/gptq-venv && /work/gptq-venv/bin/pip install torch==2.13.0 gptqmodel==7.6.0
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_GPTQMODEL_PYTHON = os.environ.get("LOTAQAF_GPTQMODEL_PYTHON", "/work/gptq-venv/bin/python")
MODEL = "embedded:smollm2"


# ------------------------------------------------------------------------------------------------
# The child: runs under the side venv's python, imports gptqmodel and torch only.
# ------------------------------------------------------------------------------------------------
def child_gptqmodel(args) -> None:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    rows = json.loads(Path(args.calib).read_text())
    calib = [{"input_ids": r, "attention_mask": [1] * len(r)} for r in rows]
    qcfg = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=args.sym, format="gptq",
                          pack_dtype=torch.int32, offload_to_disk=False)
    model = GPTQModel.load(args.source, qcfg, dtype=torch.float32)
    t0 = time.perf_counter()
    model.quantize(calib, batch_size=8)
    seconds = time.perf_counter() - t0
    model.save(args.out)
    settings = {k: getattr(qcfg, k) for k in ("sym", "desc_act", "act_group_aware", "true_sequential",
                                               "damp_percent", "damp_auto_increment", "mse")}
    print("RESULT " + json.dumps({"seconds": seconds, "settings": settings}), flush=True)


# ------------------------------------------------------------------------------------------------
# The parent: the project venv.
# ------------------------------------------------------------------------------------------------
def write_hf_source(model, tokenizer, out: Path) -> None:
    """The 16-bit model as a plain transformers directory (float32 safetensors) for gptqmodel."""
    from transformers import AutoModelForCausalLM

    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):  # the GGUF loader's record, not a quantization of these weights
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def run_gptqmodel(python: str, source: Path, calib: Path, bits: int, group_size: int, sym: bool,
                  out: Path) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--child", "--source", str(source), "--calib", str(calib),
           "--bits", str(bits), "--group-size", str(group_size), "--sym", str(sym).lower(), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent)  # gptqmodel writes ./logs there
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise SystemExit(f"gptqmodel failed (exit {proc.returncode}): " + " | ".join(tail))
    return json.loads(lines[-1][len("RESULT "):])


def parse_widths(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in w.split("/")) for w in text.split(",")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", default="4/64,3/64,2/32", help="bits/group_size, comma-separated")
    p.add_argument("--gptqmodel-python", default=DEFAULT_GPTQMODEL_PYTHON)
    p.add_argument("--gptqmodel-sym", choices=("both", "true", "false"), default="both")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for a in ("--source", "--calib", "--out"):
        p.add_argument(a, help=argparse.SUPPRESS)
    p.add_argument("--bits", type=int, help=argparse.SUPPRESS)
    p.add_argument("--group-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--sym", type=lambda v: v == "true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_gptqmodel(args)
        return 0
    if not Path(args.gptqmodel_python).is_file():
        print(f"error: no gptqmodel side venv at {args.gptqmodel_python} (make it as this script's docstring "
              "says, or pass --gptqmodel-python)", file=sys.stderr)
        return 2

    import torch

    from lotaqaf_cli.config import compose
    from lotaqaf_cli.core.perplexity import perplexity
    from lotaqaf_cli.core.quantize_model import quantize_model
    from lotaqaf_cli.data import shipped
    from lotaqaf_cli.io.checkpoint import load_quantized
    from lotaqaf_cli.io.models import load_model
    from lotaqaf_cli.stages.quantize import settings

    torch.set_num_threads(2)
    src = load_model(MODEL, "float32")
    cfg = compose(["recipe=smollm2_mmlu"])
    calib = shipped.windows(MODEL, "calib", src.source_hash, cfg.calib.n_samples, cfg.calib.seq_len, cfg.calib.seed)
    held = shipped.windows(MODEL, "heldout", src.source_hash, cfg.ppl.n_samples, cfg.ppl.seq_len, cfg.ppl.seed)
    ppl16 = perplexity(src.model, held)[0]
    print(f"16-bit held-out perplexity {ppl16:.3f} ({held.shape[0]} x {held.shape[1]} tokens); "
          f"calibration {calib.shape[0]} x {calib.shape[1]}", flush=True)
    syms = {"both": [False, True], "true": [True], "false": [False]}[args.gptqmodel_sym]

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_peers_") as tmp:
        tmp = Path(tmp)
        write_hf_source(src.model, src.tokenizer, tmp / "source")
        (tmp / "calib.json").write_text(json.dumps(calib.tolist()))
        for bits, gs in parse_widths(args.widths):
            quant = compose(["recipe=smollm2_mmlu", f"quant.bits={bits}", f"quant.group_size={gs}"]).quant
            model = load_model(MODEL, "float32").model
            t0 = time.perf_counter()
            quantize_model(model, list(calib.split(quant.batch_size)), **settings(quant))
            ours = {"tool": "lotaqaf", "bits": bits, "group_size": gs, "seconds": time.perf_counter() - t0,
                    "ppl": perplexity(model, held)[0], "settings": settings(quant)}
            rows.append(ours)
            print(f"INT{bits} g{gs} lotaqaf: ppl {ours['ppl']:.3f}, {ours['seconds']:.1f} s", flush=True)
            del model
            for sym in syms:
                out = tmp / f"gptqmodel_{bits}_{gs}_{sym}"
                res = run_gptqmodel(args.gptqmodel_python, tmp / "source", tmp / "calib.json", bits, gs, sym, out)
                peer, _tok, _info = load_quantized(out)
                row = {"tool": f"gptqmodel sym={sym}", "bits": bits, "group_size": gs, "seconds": res["seconds"],
                       "ppl": perplexity(peer, held)[0], "settings": res["settings"]}
                rows.append(row)
                print(f"INT{bits} g{gs} {row['tool']}: ppl {row['ppl']:.3f}, {row['seconds']:.1f} s", flush=True)

    print("\n| width | tool | held-out ppl | quantize s | ppl lotaqaf / this | time lotaqaf / this |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ours = next(o for o in rows if o["tool"] == "lotaqaf" and o["bits"] == r["bits"]
                    and o["group_size"] == r["group_size"])
        print(f"| INT{r['bits']} g{r['group_size']} | {r['tool']} | {r['ppl']:.3f} | {r['seconds']:.1f} | "
              f"{ours['ppl'] / r['ppl']:.3f} | {ours['seconds'] / r['seconds']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"ppl_16bit": ppl16, "rows": rows}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
