"""lotaqaf against the tools users would run instead, on the same model and data, in one run.

    .venv/bin/python scripts/bench_peers.py                      # all three parts
    .venv/bin/python scripts/bench_peers.py --part quant --widths 2/32 --gptqmodel-sym false
    .venv/bin/python scripts/bench_peers.py --part train decode  # the training step and decoding only

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

Training-step part: one INT4 g64 base (lotaqaf's quantizer, quant.method=rtn: the step's cost does not
depend on how the codes were chosen) written as a GPTQ checkpoint, the same micro-batch of 4 x 256 tokens
(the shipped calibration windows, labels = inputs), bf16 activations everywhere:
- lotaqaf LoTA-QAF (r 64, omega 48, t-SignSGD) and lotaqaf LoRA (r 16, AdamW) at precision=bf16, steps
  interleaved, in this process (scripts/bench_train.make_step);
- PEFT LoRA (r 16, alpha 32, the same 7 projections, AdamW) on gptqmodel's model loaded from the same
  checkpoint (GPTQModel.load, bf16, the kernel gptqmodel picks on CPU), in a child process of the side venv:
  what "GPTQ + LoRA" is for users today.
Medians over the timed steps after warm-up; tokens/s = 1024 / step seconds; peak memory above the memory
before the step (VmHWM reset through /proc/self/clear_refs).

Decode part: the base trained 2 steps with LoTA-QAF and merged (`lotaqaf train ... stages=[quantize,train,merge]`),
exported as gptq (integer codes, the fractional zero points as a PEFT offset branch: exact) and as GGUF Q4_1
(`lotaqaf export`), then greedy decoding at batch 1 of a 64-token prompt (the first held-out window) to
64 new tokens, prompt included in the time: lotaqaf's merged checkpoint at precision=bf16; gptqmodel + PEFT
on the gptq export (bf16); llama.cpp (llama-cpp-python, 2 threads) on the GGUF. Median of 3 each.

The side venv (about 1 GB; llama-cpp-python builds from source, ~15 min on 2 cores):
    python3 -m venv /work/gptq-venv && /work/gptq-venv/bin/pip install torch==2.13.0 gptqmodel==7.6.0 \
        peft==0.21.2 optimum==2.3.0 && CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF" /work/gptq-venv/bin/pip install \
        llama-cpp-python==0.3.36
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchutil import reset_host_peak, status_kb  # scripts/ is on sys.path when a script runs

REPO = Path(__file__).resolve().parent.parent
DEFAULT_GPTQMODEL_PYTHON = os.environ.get("LOTAQAF_GPTQMODEL_PYTHON", "/work/gptq-venv/bin/python")
MODEL = "embedded:smollm2"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PARTS = ("quant", "train", "decode")


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


def serving_child():
    """lotaqaf_cli/serving/child.py, the engine runner (a standalone file: the side venv has no lotaqaf)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("serving_child", REPO / "lotaqaf_cli" / "serving" / "child.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def timed_steps(step, batch, steps: int, warmup: int) -> dict:
    """Per timed step: seconds, and the peak above the memory before it (MB)."""
    times, peak = [], 0.0
    for k in range(warmup + steps):
        rss0 = reset_host_peak()
        t0 = time.perf_counter()
        step(batch)
        if k >= warmup:
            times.append(time.perf_counter() - t0)
            peak = max(peak, (status_kb("VmHWM") - rss0) / 1024)
    return {"times": times, "peak_mb": peak}


def child_train(args) -> None:
    """PEFT LoRA on gptqmodel's model (bf16) from the GPTQ checkpoint ``args.source``."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gptqmodel
    import peft
    import torch
    from gptqmodel import GPTQModel

    torch.set_num_threads(2)
    torch.manual_seed(0)
    ids = torch.tensor(json.loads(Path(args.calib).read_text()))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    model = GPTQModel.load(args.source, device="cpu", dtype=torch.bfloat16).model
    kernels = sorted({type(m).__name__ for m in model.modules() if "QuantLinear" in type(m).__name__
                      or "Linear" in type(m).__name__ and hasattr(m, "qweight")})
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(b):
        model(**b).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)

    res = timed_steps(step, batch, args.steps, args.warmup)
    res.update(engine=f"gptqmodel {gptqmodel.__version__} ({', '.join(kernels)}) + peft {peft.__version__}, bf16",
               trainable=sum(p.numel() for p in params),
               adapter_dtype=str(next(p for p in params).dtype))
    print("RESULT " + json.dumps(res), flush=True)


def child_decode(args) -> None:
    """Greedy decoding at batch 1 in a peer engine: gptqmodel + PEFT on a gptq export, or llama.cpp on a GGUF."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prompt = json.loads(Path(args.calib).read_text())
    times = []
    if args.engine == "llama_cpp":
        import itertools

        import llama_cpp

        serving_child().llama_cpp_without_extra_buffers()  # as the export check runs it (AMX segfaults here)
        llm = llama_cpp.Llama(model_path=str(Path(args.source) / "model.gguf"), n_ctx=len(prompt) + args.new_tokens + 8,
                              n_threads=2, verbose=False, seed=0)
        engine = f"llama-cpp-python {llama_cpp.__version__} (2 threads, extra buffer types off)"

        def generate():  # llama.cpp's own generation loop, greedy (top_k 1)
            return list(itertools.islice(llm.generate(prompt, top_k=1, temp=0.0, reset=True), args.new_tokens))
    else:
        import gptqmodel
        import peft
        import torch
        from gptqmodel import GPTQModel

        torch.set_num_threads(2)
        model = GPTQModel.load(args.source, device="cpu", dtype=torch.bfloat16).model
        model = peft.PeftModel.from_pretrained(model, str(Path(args.source) / "offset_lora")).eval()
        engine = f"gptqmodel {gptqmodel.__version__} + peft {peft.__version__} (offset branch), bf16"
        ids = torch.tensor([prompt])

        def generate():
            with torch.no_grad():
                return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                      pad_token_id=0)[0, len(prompt):].tolist()
    generate()  # warm-up
    for _ in range(args.reps):
        t0 = time.perf_counter()
        tokens = generate()
        times.append(time.perf_counter() - t0)
    print("RESULT " + json.dumps({"times": times, "engine": engine, "tokens": tokens}), flush=True)


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


def run_child(python: str, mode: str, cwd: Path, **kw) -> dict:
    """This script under ``python`` (the side venv) in child ``mode``; returns its RESULT line."""
    cmd = [python, str(Path(__file__).resolve()), f"--child-{mode}"]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)  # gptqmodel writes ./logs there
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise SystemExit(f"{mode} child failed (exit {proc.returncode}): " + " | ".join(tail))
    return json.loads(lines[-1][len("RESULT "):])


def run_gptqmodel(python: str, source: Path, calib: Path, bits: int, group_size: int, sym: bool,
                  out: Path) -> dict:
    return run_child(python, "quant", out.parent, source=source, calib=calib, bits=bits, group_size=group_size,
                     sym=str(sym).lower(), out=out)


def parse_widths(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in w.split("/")) for w in text.split(",")]


def part_quant(args, tmp: Path) -> dict:
    import torch

    from lotaqaf_cli.config import compose
    from lotaqaf_cli.core.perplexity import perplexity
    from lotaqaf_cli.core.quantize_model import quantize_model
    from lotaqaf_cli.data import shipped
    from lotaqaf_cli.io.checkpoint import load_quantized
    from lotaqaf_cli.io.models import load_model
    from lotaqaf_cli.stages.quantize import settings

    src = load_model(MODEL, "float32")
    cfg = compose(["recipe=smollm2_mmlu"])
    calib = shipped.windows(MODEL, "calib", src.source_hash, cfg.calib.n_samples, cfg.calib.seq_len, cfg.calib.seed)
    held = shipped.windows(MODEL, "heldout", src.source_hash, cfg.ppl.n_samples, cfg.ppl.seq_len, cfg.ppl.seed)
    with torch.no_grad():
        ppl16 = perplexity(src.model, held)[0]
    print(f"16-bit held-out perplexity {ppl16:.3f} ({held.shape[0]} x {held.shape[1]} tokens); "
          f"calibration {calib.shape[0]} x {calib.shape[1]}", flush=True)
    syms = {"both": [False, True], "true": [True], "false": [False]}[args.gptqmodel_sym]
    rows = []
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
    return {"ppl_16bit": ppl16, "rows": rows}


def make_run(tmp: Path) -> Path:
    """The shared work of the train and decode parts: an RTN INT4 g64 base, 2 LoTA-QAF steps, merged, and
    its gptq and GGUF exports (through the lotaqaf command line, as a user runs it). Returns the run."""
    from lotaqaf_cli.cli import main as lotaqaf

    run = tmp / "runs" / "peers"
    if (run / "export-gguf").is_dir():
        return run
    argv = ["train", "recipe=smollm2_mmlu", "quant.method=rtn", "optim.steps=2", "stages=[quantize,train,merge]",
            f"run.root={tmp / 'runs'}", f"run.dir={run}", "precision=bf16"]
    for a in (argv, ["export", "--format", "gptq", f"run.dir={run}", "export.check=false"],
              ["export", "--format", "gguf", f"run.dir={run}", "export.check=false"]):
        if lotaqaf(a) != 0:
            raise SystemExit(f"lotaqaf {' '.join(a)} failed")
    return run


def shipped_windows(role: str):
    """The default recipe's shipped calibration ("calib") or held-out ("heldout") token windows."""
    from lotaqaf_cli.config import compose
    from lotaqaf_cli.data import shipped
    from lotaqaf_cli.io.models import load_model

    sec = compose(["recipe=smollm2_mmlu"])["calib" if role == "calib" else "ppl"]
    src = load_model(MODEL, "float32", weights=False)
    return shipped.windows(MODEL, role, src.source_hash, sec.n_samples, sec.seq_len, sec.seed)


def part_train(args, tmp: Path, run: Path) -> dict:
    import bench_train  # scripts/ is on sys.path when a script runs
    import torch

    from lotaqaf_cli import precision
    from lotaqaf_cli.io.checkpoint import load_quantized

    base_dir = json.loads((run / "quantize.json").read_text())["checkpoint"]
    ids = shipped_windows("calib")[:4]
    (tmp / "batch.json").write_text(json.dumps(ids.tolist()))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    base, _tok, _info = load_quantized(base_dir)
    precision.cast_(base, torch.bfloat16)
    res = bench_train.bench({"lotaqaf LoTA-QAF": (base, "lota"), "lotaqaf LoRA": (base, "lora")}, batch,
                            args.steps, args.warmup)
    del base
    peer = run_child(args.gptqmodel_python, "train", tmp, source=base_dir, calib=tmp / "batch.json",
                     steps=args.steps, warmup=args.warmup)
    res["PEFT LoRA on gptqmodel"] = {"median_s": statistics.median(peer["times"]), **peer}
    tokens = ids.numel()
    print(f"\nTraining step, {ids.shape[0]} x {ids.shape[1]} tokens, bf16, median of {args.steps} after "
          f"{args.warmup} warm-up (peer: {peer['engine']})")
    print("| tool | step s | tokens/s | peak MB above start | trainable | tokens/s vs PEFT on gptqmodel |")
    print("|---|---|---|---|---|---|")
    ref = tokens / res["PEFT LoRA on gptqmodel"]["median_s"]
    for name, r in res.items():
        tps = tokens / r["median_s"]
        print(f"| {name} | {r['median_s']:.3f} | {tps:.0f} | {r['peak_mb']:.0f} | {r['trainable']:,} | {tps / ref:.2f} |")
    return {"tokens": tokens, "rows": {k: {kk: v for kk, v in r.items()} for k, r in res.items()}}


def part_decode(args, tmp: Path, run: Path) -> dict:
    import torch

    from lotaqaf_cli import precision
    from lotaqaf_cli.io.checkpoint import load_quantized

    prompt = shipped_windows("heldout")[0, :64]
    (tmp / "prompt.json").write_text(json.dumps(prompt.tolist()))
    held = {"model": precision.cast_(load_quantized(run / "merged")[0], torch.bfloat16).eval()}
    ids = prompt[None]

    def generate():
        with torch.no_grad():
            return held["model"].generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0)

    generate()
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        ours_tokens = generate()[0, 64:].tolist()
        times.append(time.perf_counter() - t0)
    held.clear()  # one model in memory at a time: the peers load theirs in their own processes
    rows = {"lotaqaf merged (bf16)": {"times": times, "engine": "lotaqaf (bf16)", "tokens": ours_tokens}}
    for engine, where in (("gptqmodel_peft", run / "export-gptq"), ("llama_cpp", run / "export-gguf")):
        rows[engine] = run_child(args.gptqmodel_python, "decode", tmp, source=where, calib=tmp / "prompt.json",
                                 engine=engine, new_tokens=args.new_tokens, reps=args.reps)
    print(f"\nDecode at batch 1: {len(prompt)}-token prompt + {args.new_tokens} greedy tokens, median of {args.reps}")
    print("| engine | seconds | new tokens/s | lotaqaf / this (speed) | same tokens as lotaqaf |")
    print("|---|---|---|---|---|")
    ours = statistics.median(times)
    for r in rows.values():
        t = statistics.median(r["times"])
        same = sum(a == b for a, b in zip(r["tokens"], ours_tokens, strict=True))
        print(f"| {r['engine']} | {t:.2f} | {args.new_tokens / t:.1f} | {t / ours:.2f} | {same}/{len(ours_tokens)} |")
    return {"new_tokens": args.new_tokens, "prompt_tokens": len(prompt), "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--widths", default="4/64,3/64,2/32", help="quant: bits/group_size, comma-separated")
    p.add_argument("--gptqmodel-python", default=DEFAULT_GPTQMODEL_PYTHON)
    p.add_argument("--gptqmodel-sym", choices=("both", "true", "false"), default="both")
    p.add_argument("--steps", type=int, default=5, help="train: timed steps")
    p.add_argument("--warmup", type=int, default=2, help="train: warm-up steps")
    p.add_argument("--new-tokens", type=int, default=64, help="decode: greedy tokens")
    p.add_argument("--reps", type=int, default=3, help="decode: repetitions")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--workdir", default=None, help="keep the checkpoints, run and exports here (reused when there)")
    for mode in PARTS:
        p.add_argument(f"--child-{mode}", action="store_true", help=argparse.SUPPRESS)
    for a in ("--source", "--calib", "--out", "--engine"):
        p.add_argument(a, help=argparse.SUPPRESS)
    p.add_argument("--bits", type=int, help=argparse.SUPPRESS)
    p.add_argument("--group-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--sym", type=lambda v: v == "true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for mode, fn in (("quant", child_gptqmodel), ("train", child_train), ("decode", child_decode)):
        if getattr(args, f"child_{mode}"):
            fn(args)
            return 0
    if not Path(args.gptqmodel_python).is_file():
        print(f"error: no gptqmodel side venv at {args.gptqmodel_python} (make it as this script's docstring "
              "says, or pass --gptqmodel-python)", file=sys.stderr)
        return 2

    import torch

    torch.set_num_threads(2)
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench_peers_") as tmp:
        tmp = Path(args.workdir or tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        if "quant" in args.part:
            out["quant"] = part_quant(args, tmp)
        if "train" in args.part or "decode" in args.part:
            run = make_run(tmp)
            if "train" in args.part:
                out["train"] = part_train(args, tmp, run)
            if "decode" in args.part:
                out["decode"] = part_decode(args, tmp, run)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
