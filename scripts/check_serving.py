#!/usr/bin/env python3
"""`make check-serving`: the merged SmolLM2 at 2, 3 and 4 bits (offset factor on), exported to every
format and run in the engines that serve them; prints the table of docs/formats.md.

    python scripts/check_serving.py [--steps 40] [--bits 2 3 4] [--out runs/serving]

1. A side venv (.serving-venv, git-ignored; made once, ~15 min: llama-cpp-python builds from source)
   with the engines lotaqaf does not depend on: llama-cpp-python, gptqmodel + optimum + peft, torchao.
2. Per width: `lotaqaf train recipe=smollm2_mmlu quant.bits=B stages=[quantize,train,merge]` (a short
   training; the check is about serving, not accuracy), then `lotaqaf export --format F
   export.check_python=.serving-venv/bin/python` for gguf, torchao and gptq, and GGUF's smaller
   K-quants on request (`export.gguf_type=q4_k`, q2_k at 2 bits, --allow-lossy): each export runs its
   engines (8 prompts, 32 greedy tokens, teacher-forced logits) and records them in export-F.json.
3. One run from a Hugging Face source (SmolLM2 converted to a transformers directory here, calibrated
   and trained on local files), exported to GGUF: the tokenizer metadata built from the HF tokenizer,
   checked by llama.cpp's own tokenizer.
4. llama.cpp's arithmetic floor: every tensor of the Q4_1 file rewritten as F32 (the gguf package's
   dequantizer) and run in llama.cpp against lotaqaf on the same values, so that the table separates
   what storage explains from what llama.cpp's quantized dot products (activations rounded to 8
   bits) add.
Runs and exports are reused when they exist (delete --out to start over).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVE = ROOT / ".serving-venv"
ENGINE_PACKAGES = ["gptqmodel==7.6.0", "optimum==2.3.0", "peft==0.21.2", "torchao==0.18.0", "numpy"]
LLAMA_CPP = "llama-cpp-python==0.3.36"
# llama.cpp's library only: no tools, examples, tests or server (halves the build on 2 cores)
LLAMA_CMAKE = ("-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF "
               "-DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF")
LOTAQAF = [sys.executable, "-m", "lotaqaf_cli"]


def say(msg: str) -> None:
    print(msg, flush=True)


def sh(cmd: list[str], **kw) -> None:
    say("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def ensure_serving_venv() -> Path:
    python = SERVE / "bin" / "python"
    stamp = SERVE / ".lotaqaf-serving"
    if stamp.exists():
        return python
    t0 = time.time()
    if not python.exists():
        sh([sys.executable, "-m", "venv", SERVE])
    pip = [python, "-m", "pip", "install", "-q", "-c", ROOT / "constraints.txt"]
    sh([*pip, "torch==2.13.0"])
    sh([*pip, *ENGINE_PACKAGES])
    env = {**os.environ, "CMAKE_ARGS": LLAMA_CMAKE, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    sh([*pip, LLAMA_CPP], env=env)
    stamp.write_text(f"made in {time.time() - t0:.0f} s\n")
    return python


def lotaqaf(*args: str, cwd: Path) -> None:
    sh([*LOTAQAF, *args], cwd=cwd)


def hf_source(out: Path) -> tuple[Path, Path, Path]:
    """SmolLM2 as a transformers directory (from the embedded GGUF), a text file (calibration and
    held-out perplexity: lotaqaf's docs, one paragraph a line) and a JSONL of the shipped training
    conversations."""
    d, text, train = out / "smollm2-hf", out / "text.txt", out / "train.jsonl"
    if not (d / "config.json").exists():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lotaqaf_cli.io.models import embedded_model_path

        gguf = embedded_model_path("smollm2")
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        cfg = loaded.config
        if hasattr(cfg, "quantization_config"):  # transformers will not save a model it dequantized from GGUF
            del cfg.quantization_config
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(d))
        model.save_pretrained(str(d))
    if not text.exists():  # written once: the docs change, the run's calibration and held-out text must not
        paras = [p.replace("\n", " ").strip() for f in sorted((ROOT / "docs").rglob("*.md"))
                 for p in f.read_text().split("\n\n") if len(p) > 200]
        text.write_text("\n".join(paras) + "\n")
    if not train.exists():
        records = json.loads((ROOT / "lotaqaf_cli/data/shipped/smollm2-train.json").read_text())["records"]
        train.write_text("".join(json.dumps(r) + "\n" for r in records))
    return d, text, train


def llama_cpp_floors(run: Path, python: Path) -> dict:
    """Where llama.cpp's difference on the Q4_1 file comes from, from one load of the merged model:
    - llama_cpp_f32: llama.cpp on the file's exact values, every tensor stored as F32 (no quantized dot
      product anywhere: the Q8_0 embedding the tied output head reads would round activations too),
      against lotaqaf on the same values: what llama.cpp's float arithmetic alone changes;
    - lotaqaf_q8_activations: lotaqaf on the file's values with the input of every linear rounded as
      llama.cpp's quantized dot products round it (Q8_1 / Q8_0: per 32 values, d = max|x| / 127 in
      fp16, codes round(x / d)), against lotaqaf's merged model: what that rounding alone changes."""
    import gguf
    import numpy as np
    import torch

    from lotaqaf_cli.core.qlinear import dequantized_model
    from lotaqaf_cli.io.checkpoint import load_quantized
    from lotaqaf_cli.io.gguf_export import copy_gguf_metadata, stored_model
    from lotaqaf_cli.serving.engines import engine_check
    from lotaqaf_cli.serving.probe import PROBE_TEXTS, compare_probe, probe_prompts, reference_probe

    dst_dir = run / "gguf-f32-floor"
    dst_dir.mkdir(exist_ok=True)
    reader = gguf.GGUFReader(str(run / "export-gguf/model.gguf"))
    w = gguf.GGUFWriter(str(dst_dir / "model.gguf"), reader.fields["general.architecture"].contents())
    copy_gguf_metadata(w, reader)
    for t in reader.tensors:
        w.add_tensor(t.name, np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    model, tok, _ = load_quantized(run / "merged")
    prompts = probe_prompts(tok, model.config.vocab_size)
    conts, logits = reference_probe(model, prompts, dense=True)
    held = dequantized_model(stored_model(model))  # the file's values, in float32
    del model
    held_conts, held_logits = reference_probe(held, prompts)
    f32 = engine_check("llama_cpp", dst_dir, prompts, held_conts, held_logits, [str(python)], list(PROBE_TEXTS))

    def q8(_module, args):
        x = args[0]
        blocks = x.reshape(*x.shape[:-1], -1, 32)
        d = blocks.abs().amax(-1, keepdim=True) / 127
        codes = torch.round(blocks / torch.where(d > 0, d, 1))
        return ((d.half().float() * codes).reshape(x.shape),)

    for m in held.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(q8)
    return {"llama_cpp_f32": f32,
            "lotaqaf_q8_activations": compare_probe(conts, logits, *reference_probe(held, prompts, forced_on=conts))}


def row(width: str, fmt: str, rep: dict, kind: str) -> str:
    e = rep.get("engines", {}).get(kind, {"checked": False, "why": "not run"})
    size = f"{rep['size_bytes'] / 2**20:.1f} MiB, {rep['bits_per_weight']:.2f} b/w"
    if not e["checked"]:
        return f"| {fmt} | {width} | {kind} | not checked: {e['why']} | | {size} |"
    tok = f"; tokenizer ids {e['tokenizer_same_ids']}/8" if "tokenizer_same_ids" in e else ""
    st = rep["storage_on_prompts"]
    return (f"| {fmt} | {width} | {e['engine']} | {e['same_continuations']}/{e['prompts']}{tok} | "
            f"{e['max_abs_logit_diff']:.2e} (stored values in lotaqaf: {st['same_continuations']}/{st['prompts']}, "
            f"{st['max_abs_logit_diff']:.2e}) | {size} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "serving")
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face-sourced run")
    a = ap.parse_args()
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    python = ensure_serving_venv()
    runs = {f"INT{b}": (out / f"smollm2-w{b}", [f"quant.bits={b}"]) for b in a.bits}
    if not a.no_hf:
        d, text, train = hf_source(out)
        runs["INT4, HF source"] = (out / "smollm2-hf-w4", [
            f"model.path={d}", "calib=file", f"calib.path={text}", "calib.n_samples=32", "calib.seq_len=256",
            "data=jsonl", f"data.path={train}", "ppl.source=file", f"ppl.path={text}", "quant.bits=4"])
    rows, floors = [], {}
    for width, (run, extra) in runs.items():
        if not (run / "merged").exists():
            lotaqaf("train", "recipe=smollm2_mmlu", f"run.dir={run}", "stages=[quantize,train,merge]",
                    f"optim.steps={a.steps}", *extra, cwd=ROOT)
        exports = {"gguf": []} if "HF" in width else {"gguf": [], "torchao": [], "gptq": []}
        if "HF" not in width:  # the smaller K-quants, lossy: Q4_K at every width, Q2_K at 2 bits
            exports.update({f"gguf-{k}": [f"export.gguf_type={k}", "--allow-lossy"]
                            for k in (["q4_k", "q2_k"] if width == "INT2" else ["q4_k"])})
        for name, args in exports.items():
            if not (run / f"export-{name}.json").exists():
                lotaqaf("export", f"run={run}", "--format", name.split("-")[0], *args,
                        f"export.check_python={python}", cwd=ROOT)
            rep = json.loads((run / f"export-{name}.json").read_text())
            for kind in rep.get("engines", {}):
                rows.append(row(width, name, rep, kind))
        floors[width] = llama_cpp_floors(run, python)
    say("\n| format | width | engine | same greedy continuations (of 8 x 32 tokens) | max abs logit diff (the stored "
        "values, run in lotaqaf float32) | size, bits per quantized weight |")
    say("|---|---|---|---|---|---|")
    for r in rows:
        say(r)
    say("\nWhere llama.cpp's difference comes from (Q4_1 file):")
    for width, f in floors.items():
        e, q = f["llama_cpp_f32"], f["lotaqaf_q8_activations"]
        f32 = (f"{e['same_continuations']}/8, max |logit diff| {e['max_abs_logit_diff']:.2e}" if e["checked"] else e["why"])
        say(f"- {width}: llama.cpp on the file's values as F32, against lotaqaf on the same values: {f32}; "
            f"lotaqaf with activations rounded as Q8_1, against the merged model: {q['same_continuations']}/8, "
            f"max |logit diff| {q['max_abs_logit_diff']:.2e}")
    (out / "table.md").write_text("\n".join(rows) + "\n")
    (out / "floors.json").write_text(json.dumps(floors, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
