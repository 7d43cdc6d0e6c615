"""The memory plan (`lotaqaf plan`) against each stage's measured peak, on a Llama-3-8B-shaped model.

A random-weight Llama with Llama-3-8B's layer shapes (hidden 4096, intermediate 14336, 32 heads, 8 KV
heads, head_dim 128, vocab 128256, untied embeddings, rope_theta 500000) but only a few decoder layers.

    python scripts/bench_memory.py                 # 8B shapes, 2 layers, CPU: ~20 min on 2 cores (GPTQ ~7 min a layer)
    python scripts/bench_memory.py --hidden 512 --intermediate 1408 --vocab 49152   # a dry run in ~2 min
                                                   # (--vocab >= 49152: the tokenizer's ids)
    python scripts/bench_memory.py --stages train,merge --workdir runs/bench_memory --keep --out mem.json

What it does:
1. builds the model in --workdir (bf16 safetensors, one shard for the embeddings, one per decoder
   layer, one for the norm and lm_head, written tensor by tensor; weights N(0, 0.02)) with the embedded
   SmolLM2's tokenizer (ids < 49152), plus a calibration text, a held-out text and a JSONL training
   file whose examples fill data.source_len + data.target_len;
2. runs each stage in a fresh process on one run directory (recipe llama3_mmlu: INT4 g64, LoTA r 64,
   gradient checkpointing; calib/ppl/data from those files):
       quantize  `lotaqaf quantize ...`
       train     `lotaqaf train ... stages=[train]`   (reads the cached quantized base)
       merge     `lotaqaf train ... stages=[merge]`   (reads the run's adapter onto its base)
       eval      `lotaqaf eval ... --model merged`    (eval.tasks=[ppl]: the lightest eval task)
   The first three go through the chain, whose memory.json holds the stage's measured peak (VmHWM after
   a reset at the stage's start) and the plan of that invocation; `lotaqaf eval` writes no memory.json
   (it is the command a user runs on a finished run), so the eval row's measurement is the
   process's peak (VmHWM) and its plan comes from `lotaqaf plan ... stages=[eval]` with the same
   overrides (eval.batch_size=1: the plan's eval forward, 1 x 1024 tokens, is then the ppl task's
   4 x 256 windows);
3. prints, per stage, plan GB, measured GB, plan / measured, the plan's largest terms, the wall time,
   and the commands it ran; --out writes the same as JSON.

The plan is for a chained run (`lotaqaf train` holding earlier stages' objects); each row here is one
stage in its own process, which is what a fresh `lotaqaf train stages=[...]` or `lotaqaf merge` needs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("quantize", "train", "merge", "eval")
MADE = ("model", "data", "runs", "logs", "plans")   # what the script writes inside --workdir

# A child process: the command line through lotaqaf's own main(), then its peak resident set (VmHWM;
# not ru_maxrss, which keeps the launching process's resident set from before exec) into a file.
DRIVER = """
import json, os, sys
from lotaqaf_cli.cli import main
rc = main(sys.argv[1:])
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
with open(os.environ["BENCH_MEMORY_RESULT"], "w") as f:
    json.dump({"rc": rc, "process_peak_gb": round(hwm * 1024 / 1e9, 3)}, f)
sys.exit(rc)
"""

WORDS = ("the a of and to in is was for on that with as by at from it an be this which or are were has "
         "have had not but all one two three first new more other some time year people way day man "
         "water river light star cell number history music tree energy market city because then next "
         "finally model question answer reads writes about small large early late high low long short "
         "north south east west under over between through during before after world house school "
         "paper system program problem result study group company country government family child "
         "mountain ocean forest island village bridge road engine machine theory method garden winter "
         "summer spring autumn morning evening").split()


def say(msg: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# the model and the data
# ---------------------------------------------------------------------------------------------

def shape_of(args) -> dict:
    heads = args.heads or args.hidden // args.head_dim
    return {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers, "heads": heads,
            "kv_heads": args.kv_heads or max(1, heads // 4), "head_dim": args.head_dim, "vocab": args.vocab,
            "rope_theta": 500000.0, "tied": False}


def params_of(s: dict) -> int:
    h, q, kv, i = s["hidden"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"], s["intermediate"]
    layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
    return s["layers"] * layer + 2 * s["vocab"] * h + h


def _randn(rows: int, cols: int, g, std: float = 0.02):
    """N(0, std) as bf16, drawn in chunks of ~16M floats (never the whole matrix in float32)."""
    import torch

    out = torch.empty(rows, cols, dtype=torch.bfloat16)
    step = max(1, 2**24 // cols)
    for r in range(0, rows, step):
        n = min(step, rows - r)
        out[r:r + n] = torch.randn(n, cols, generator=g).mul_(std)
    return out


def build_model(d: Path, s: dict, seed: int = 0):
    """A random LlamaForCausalLM of shape ``s`` in ``d`` as bf16 safetensors shards (embeddings | one per
    decoder layer | norm + lm_head) with the embedded SmolLM2's tokenizer; returns the tokenizer. A
    directory already built with the same shape is reused."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from lotaqaf_cli.io.models import embedded_model_path

    marker = d / "bench_memory.json"
    if marker.is_file() and json.loads(marker.read_text()) == {**s, "seed": seed}:
        say(f"model: reusing {d}")
        return AutoTokenizer.from_pretrained(str(d))
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    gguf = embedded_model_path("smollm2")   # no hub: SmolLM2's tokenizer (ids < 49152) from the embedded GGUF
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if len(tok) > s["vocab"]:
        raise SystemExit(f"--vocab {s['vocab']} is smaller than the tokenizer's {len(tok)} tokens")
    h, hd = s["hidden"], s["head_dim"]
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=h, intermediate_size=s["intermediate"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                      num_key_value_heads=s["kv_heads"], head_dim=hd, max_position_embeddings=8192,
                      rope_theta=s["rope_theta"], rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      torch_dtype="bfloat16", architectures=["LlamaForCausalLM"])
    g = torch.Generator().manual_seed(seed)
    n = s["layers"] + 2
    weight_map, total = {}, 0

    def shard(k: int, tensors: dict) -> None:
        nonlocal total
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(d / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    t0 = time.time()
    shard(0, {"model.embed_tokens.weight": _randn(s["vocab"], h, g)})
    q, kv, i = s["heads"] * hd, s["kv_heads"] * hd, s["intermediate"]
    for li in range(s["layers"]):
        p = f"model.layers.{li}."
        shard(li + 1, {p + "self_attn.q_proj.weight": _randn(q, h, g), p + "self_attn.k_proj.weight": _randn(kv, h, g),
                       p + "self_attn.v_proj.weight": _randn(kv, h, g), p + "self_attn.o_proj.weight": _randn(h, q, g),
                       p + "mlp.gate_proj.weight": _randn(i, h, g), p + "mlp.up_proj.weight": _randn(i, h, g),
                       p + "mlp.down_proj.weight": _randn(h, i, g),
                       p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                       p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)})
        say(f"model: decoder layer {li + 1}/{s['layers']} written")
    shard(n - 1, {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16), "lm_head.weight": _randn(s["vocab"], h, g)})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                "weight_map": weight_map}, indent=1))
    cfg.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    marker.write_text(json.dumps({**s, "seed": seed}))
    say(f"model: {params_of(s) / 1e9:.2f} B parameters, {total / 1e9:.2f} GB bf16 in {n} shards, "
        f"{time.time() - t0:.0f} s ({d})")
    return tok


def words(rng: random.Random, n: int) -> str:
    out, line = [], []
    for _ in range(n):
        line.append(rng.choice(WORDS))
        if len(line) >= rng.randint(8, 20):
            out.append(" ".join(line) + ".")
            line = []
    return " ".join(out + ([" ".join(line) + "."] if line else []))


def write_text(path: Path, n_lines: int, seed: int) -> Path:
    """Plain text, one document a line (calib=file / ppl.source=file)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(words(rng, 120) for _ in range(n_lines)) + "\n")
    return path


def write_jsonl(path: Path, tok, n: int, source_len: int, target_len: int, seed: int = 5) -> Path:
    """``n`` instruction/output records, each long enough to fill source_len + target_len tokens as
    lotaqaf tokenizes them (checked with lotaqaf's own tokenization)."""
    from lotaqaf_cli.data.sft import to_messages, tokenize_records

    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    k = 1.0
    while True:
        recs = [{"instruction": words(rng, int(source_len * k) + 8), "input": "",
                 "output": words(rng, int(target_len * k) + 8)} for _ in range(n)]
        lens = [len(e["input_ids"]) for e in tokenize_records(tok, [{"messages": to_messages(r)} for r in recs],
                                                              source_len, target_len)]
        if min(lens) == source_len + target_len:
            break
        k *= 1.5
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


# ---------------------------------------------------------------------------------------------
# running lotaqaf
# ---------------------------------------------------------------------------------------------

def common_overrides(args, w: Path, data: dict) -> list[str]:
    src, tgt = args.seq_len - args.seq_len // 4, args.seq_len // 4
    return ["recipe=llama3_mmlu", f"model.path={w / 'model'}", "model.dtype=bfloat16", f"device={args.device}",
            "calib=file", f"calib.path={data['calib']}", f"calib.n_samples={args.calib_samples}",
            f"calib.seq_len={args.calib_len}", f"quant.batch_size={min(args.calib_samples, 4)}",
            "data=jsonl", f"data.path={data['train']}", f"data.source_len={src}", f"data.target_len={tgt}",
            f"optim.steps={args.steps}", f"optim.batch_size={args.batch_size}", "optim.grad_accum=1",
            f"optim.gradient_checkpointing={str(args.checkpointing).lower()}",
            "ppl.source=file", f"ppl.path={data['heldout']}", f"ppl.n_samples={args.ppl_samples}",
            f"ppl.seq_len={args.ppl_len}", f"ppl.batch_size={args.ppl_samples}",
            "eval.tasks=[ppl]", "eval.batch_size=1", f"run.root={w / 'runs'}", *args.override]


def command_for(stage: str, common: list[str], run_dir: Path) -> list[str]:
    rd = f"run.dir={run_dir}"
    if stage == "quantize":
        return ["quantize", *common, rd]
    if stage == "eval":
        return ["eval", *common, rd, "--model", "merged"]
    return ["train", *common, f"stages=[{stage}]", rd]


def shown(argv: list[str]) -> str:
    import shlex

    return "lotaqaf " + " ".join(shlex.quote(a) for a in argv)


def _rss_gb(pid: int) -> str:
    try:
        kib = next(int(ln.split()[1]) for ln in open(f"/proc/{pid}/status") if ln.startswith("VmRSS:"))
        return f"{kib * 1024 / 1e9:.2f} GB"
    except (OSError, StopIteration):
        return "?"


def run_lotaqaf(argv: list[str], log: Path, label: str, retries: int = 2) -> dict:
    """``lotaqaf argv`` in a fresh process (its output into ``log``): exit code, the process's peak
    resident set, seconds. A failure at import time (a module being edited) is retried after a minute."""
    log.parent.mkdir(parents=True, exist_ok=True)
    result = log.with_suffix(".result.json")
    env = {**os.environ, "BENCH_MEMORY_RESULT": str(result), "PYTHONPATH": str(ROOT) + os.pathsep
           + os.environ.get("PYTHONPATH", ""), "COLUMNS": "160"}
    for attempt in range(retries + 1):
        result.unlink(missing_ok=True)
        t0 = time.time()
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, "-c", DRIVER, *argv], stdout=f, stderr=subprocess.STDOUT,
                                    env=env, cwd=str(ROOT))
            last = t0
            while proc.poll() is None:
                time.sleep(2)
                if time.time() - last >= 60:
                    last = time.time()
                    tail = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
                    say(f"{label}: running for {last - t0:.0f} s, resident {_rss_gb(proc.pid)}"
                        + (f"; last line of its log: {tail[-1][:90]}" if tail else ""))
        secs = round(time.time() - t0, 1)
        text = log.read_text(errors="replace")
        out = json.loads(result.read_text()) if result.is_file() else {"rc": proc.returncode, "process_peak_gb": None}
        out.update(rc=proc.returncode, seconds=secs)
        if proc.returncode == 0:
            return out
        transient = any(e in text for e in ("ImportError", "SyntaxError", "IndentationError"))
        if not transient or attempt == retries:
            say(f"{label}: FAILED (exit {proc.returncode}); the end of {log}:\n" + "\n".join(text.splitlines()[-25:]))
            return out
        say(f"{label}: failed at import (a module being edited?); retrying in 60 s")
        time.sleep(60)
    return out


def plan_via_cli(common: list[str], stage: str, out_dir: Path, log: Path) -> dict | None:
    """The plan of ``stage`` from `lotaqaf plan` with the same overrides (its plan.json)."""
    argv = ["plan", *common, f"stages=[{stage}]", f"run.dir={out_dir}"]
    r = run_lotaqaf(argv, log, f"plan {stage}")
    f = out_dir / "plan.json"
    return {"argv": argv, **json.loads(f.read_text())} if r["rc"] == 0 and f.is_file() else None


def top_terms(parts: dict, n: int = 3) -> list[tuple[str, float]]:
    return sorted(parts.items(), key=lambda kv: -kv[1])[:n]


def row_of(stage: str, plan_stage: dict | None, measured: float | None, how: str, seconds: float, extra: dict) -> dict:
    gb = plan_stage["gb"] if plan_stage else None
    host = {"plan_host_gb": plan_stage["host_gb"]} if plan_stage and "host_gb" in plan_stage else {}  # CUDA plans
    return {"stage": stage, "plan_gb": gb, "measured_gb": measured, "measured_as": how, **host,
            "plan_over_measured": round(gb / measured, 2) if gb and measured else None,
            "parts_gb": plan_stage["parts_gb"] if plan_stage else {},
            "largest_terms": [[k, v] for k, v in top_terms(plan_stage["parts_gb"])] if plan_stage else [],
            "seconds": seconds, **extra}


def table(rows: list[dict]) -> str:
    def f(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    start = any(r.get("start_gb") is not None for r in rows)   # memory.json's start_gb, where the chain writes it
    out = ["| stage | plan GB | measured GB | plan / measured |" + (" held at start GB |" if start else "")
           + " wall s | plan's largest terms (GB) |", "|---|---|---|---|" + ("---|" if start else "") + "---|---|"]
    for r in rows:
        terms = ", ".join(f"{k} {v:.2f}" for k, v in r["largest_terms"])
        out.append(f"| {r['stage']}{r.get('note', '')} | {f(r['plan_gb'])} | {f(r['measured_gb'])} | "
                   f"{f(r['plan_over_measured'])} |" + (f" {f(r.get('start_gb'))} |" if start else "")
                   + f" {r['seconds']:.0f} | {terms} |")
    return "\n".join(out)


def stage_extra(stage: str, run_dir: Path) -> dict:
    """What the stage's record says about its own time (and, for quantize, whether it quantized)."""
    def rec(name):
        f = run_dir / f"{name}.json"
        return json.loads(f.read_text()) if f.is_file() else {}

    if stage == "quantize":
        q = rec("quantize")
        return {"cached": q.get("cached"), "streamed": q.get("streamed"),
                "stage_s": (q.get("timings") or {}).get("quantize_s")}
    if stage == "train":
        return {"stage_s": (rec("train").get("timings") or {}).get("train_s")}
    if stage == "merge":
        return {"stage_s": rec("merge_certificate").get("seconds")}
    return {}


# ---------------------------------------------------------------------------------------------

def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--workdir", default=None, help="where the model, data and runs go (default: a new /tmp dir)")
    ap.add_argument("--keep", action="store_true", help="keep what the script wrote in --workdir")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=None, help="default hidden / head_dim")
    ap.add_argument("--kv-heads", type=int, default=None, help="default heads / 4")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--batch-size", type=int, default=2, help="optim.batch_size (sequences per micro-batch)")
    ap.add_argument("--seq-len", type=int, default=1024, help="tokens per training sequence (3/4 prompt, 1/4 answer)")
    ap.add_argument("--steps", type=int, default=2, help="optim.steps")
    ap.add_argument("--checkpointing", type=lambda v: v.lower() in ("1", "true", "yes", "on"), default=True,
                    help="optim.gradient_checkpointing (true, as llama3_mmlu)")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--ppl-samples", type=int, default=4, help="held-out windows (merge certificate, eval ppl)")
    ap.add_argument("--ppl-len", type=int, default=256)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="an extra override for every lotaqaf command (repeatable)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in args.stages if s not in STAGES]
    if bad:
        ap.error(f"--stages: unknown {bad}; choose from {','.join(STAGES)}")
    args.stages = [s for s in STAGES if s in args.stages]   # the chain's order
    return args


def main(argv=None) -> int:
    args = parse(argv)
    w = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_memory-"))
    w = w.absolute()
    created = not w.exists() or not any(w.iterdir())
    w.mkdir(parents=True, exist_ok=True)
    s = shape_of(args)
    t_all = time.time()
    say(f"work directory {w}; stages {', '.join(args.stages)}")
    tok = build_model(w / "model", s)
    src, tgt = args.seq_len - args.seq_len // 4, args.seq_len // 4
    data = {"calib": write_text(w / "data" / "calib.txt", 400, seed=1),
            "heldout": write_text(w / "data" / "heldout.txt", 200, seed=2),
            "train": write_jsonl(w / "data" / "train.jsonl", tok, max(8, args.steps * args.batch_size), src, tgt)}
    del tok
    say(f"data: {data['train']} ({args.batch_size} x {src}+{tgt} tokens a micro-batch), calibration "
        f"{args.calib_samples} x {args.calib_len}, held-out {args.ppl_samples} x {args.ppl_len}")
    common = common_overrides(args, w, data)
    run_dir = w / "runs" / f"run-{dt.datetime.now():%Y%m%d-%H%M%S}"
    rows, commands, ok = [], [], True
    for stage in args.stages:
        argv = command_for(stage, common, run_dir)
        commands.append(shown(argv))
        say(f"{stage}: {shown(argv)}")
        r = run_lotaqaf(argv, w / "logs" / f"{stage}.log", stage)
        if r["rc"] != 0:
            ok = False
            rows.append({"stage": stage, "failed": True, "rc": r["rc"], "seconds": r["seconds"],
                         "plan_gb": None, "measured_gb": None, "plan_over_measured": None, "largest_terms": []})
            break
        mem_file = run_dir / "memory.json"
        mem = json.loads(mem_file.read_text()) if stage != "eval" and mem_file.is_file() else None
        if mem is not None:
            shutil.copy(mem_file, w / "logs" / f"memory-{stage}.json")  # the next stage rewrites it
        plan = (mem or {}).get("plan")
        plan_stage = (plan or {}).get("stages", {}).get(stage)
        plan_src = "memory.json"
        if plan_stage is None:
            p = plan_via_cli(common, stage, w / "plans" / stage, w / "logs" / f"plan-{stage}.log")
            if p is not None:
                commands.append(shown([*p["argv"]]))
                plan, plan_stage, plan_src = p, p["stages"].get(stage), "lotaqaf plan"
        measured = (mem or {}).get("peak_gb", {}).get(stage)
        how = "stage peak (memory.json)"
        if measured is None:
            measured, how = r["process_peak_gb"], "process peak (VmHWM)"
        row = row_of(stage, plan_stage, measured, how, r["seconds"],
                     {"plan_from": plan_src, "process_peak_gb": r["process_peak_gb"],
                      "start_gb": (mem or {}).get("start_gb", {}).get(stage), **stage_extra(stage, run_dir)})
        if row.get("cached"):
            row["note"] = " (cached base: not a quantization)"
        rows.append(row)
        say(f"{stage}: done in {r['seconds']:.0f} s; plan {row['plan_gb']} GB, measured {measured} GB ({how})"
            + (f", plan/measured {row['plan_over_measured']}" if row["plan_over_measured"] else ""))
    wall = round(time.time() - t_all, 1)

    print("\ncommands (each in a fresh process):")
    for c in commands:
        print("  " + c)
    print(f"\nmodel: random Llama, {s['layers']} layers, hidden {s['hidden']}, intermediate {s['intermediate']}, "
          f"heads {s['heads']}/{s['kv_heads']} x {s['head_dim']}, vocab {s['vocab']} "
          f"({params_of(s) / 1e9:.2f} B parameters, bf16); device {args.device}\n")
    print(table(rows))
    print("\nplan terms per stage (GB):")
    for r in rows:
        if r.get("parts_gb"):
            print(f"  {r['stage']}: " + ", ".join(f"{k} {v:.3f}" for k, v in top_terms(r["parts_gb"], 99)))
    print(f"\nmeasured: {'; '.join(sorted({r['stage'] + ': ' + r['measured_as'] for r in rows if r.get('measured_as')}))}")
    print(f"wall time {wall:.0f} s")
    result = {"shape": s, "params_billion": round(params_of(s) / 1e9, 3), "device": args.device,
              "settings": {"batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
                           "gradient_checkpointing": args.checkpointing,
                           "calibration": f"{args.calib_samples} x {args.calib_len}",
                           "heldout": f"{args.ppl_samples} x {args.ppl_len}"},
            "commands": commands, "rows": rows, "wall_s": wall, "run_dir": str(run_dir), "ok": ok}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"results: {args.out}")
    if args.keep or not ok:
        print(f"kept {w}" + ("" if args.keep else " (a stage failed: its log is in logs/)"))
    else:
        for name in MADE:
            shutil.rmtree(w / name, ignore_errors=True)
        if created:
            shutil.rmtree(w, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
