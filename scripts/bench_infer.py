"""Inference cost of a merged LoTA-QAF model vs plain GPTQ and GPTQ + unmerged 16-bit LoRA, on one
quantized base, in one process.

    .venv/bin/python scripts/bench_infer.py                      # SmolLM2-135M, RTN INT4 g64 base
    .venv/bin/python scripts/bench_infer.py --new-tokens 32      # quicker
    .venv/bin/python scripts/bench_infer.py --bits 2             # another width
    .venv/bin/python scripts/bench_infer.py --precision bf16     # one precision (default: fp32 and bf16)

(a) plain GPTQ, (b) GPTQ + unmerged LoRA (r 16, all 7 projections), (c) merged LoTA-QAF (r 64,
omega 48, fractional zero points), all with kernels=auto, and (d) the merged model with kernels=torch
(dequantize every weight, then matmul: what every layer did before the kernels). Reports greedy
generation throughput (tokens/s) at batch 1 and batch 8 with a fixed number of new tokens, and
prefill time of a batch of prompts, with the ratios c/b, c/a and c/d, then one token through the
quantized layers alone. The adapters hold random (non-zero) values: speed does not depend on what
was learned. Every model runs at each precision asked for (precision.py: non-quantized tensors and
activations in float32 or bf16), and every measurement is interleaved over all of them (medians over
repetitions); the ratios compare models at the same precision.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import lotaqaf_kernels as kernels
import torch

from lotaqaf_cli import precision
from lotaqaf_cli.core.lora import attach_lora
from lotaqaf_cli.core.merge import merge_model
from lotaqaf_cli.core.qlinear import QuantLinear
from lotaqaf_cli.core.quantize_model import quantize_model
from lotaqaf_cli.core.ternary import TernaryLinear, attach_ternary_adapters
from lotaqaf_cli.io.models import load_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class KernelMode(torch.nn.Module):
    """A model run with a fixed kernel mode (lotaqaf_kernels.set_mode around each call)."""

    def __init__(self, model, mode):
        super().__init__()
        self.model, self.mode = model, mode

    def forward(self, *a, **k):
        return self._with(lambda: self.model(*a, **k))

    def generate(self, *a, **k):
        return self._with(lambda: self.model.generate(*a, **k))

    def _with(self, fn):
        before = kernels.mode()
        kernels.set_mode(self.mode)
        try:
            return fn()
        finally:
            kernels.set_mode(before)


def build(args):
    src = load_model("embedded:smollm2")
    g = torch.Generator().manual_seed(0)
    base = src.model
    quantize_model(base, [torch.randint(100, 40000, (2, 32), generator=g)], bits=args.bits, group_size=64,
                   method="rtn")
    lora = copy.deepcopy(base)
    attach_lora(lora, "lora", 16, 32, 0.0, TARGETS)
    lota = copy.deepcopy(base)
    attach_ternary_adapters(lota, 64, 48, "group", TARGETS, generator=g)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.01, generator=g)
        for m in lota.modules():
            if isinstance(m, TernaryLinear):
                m.B_T.copy_(torch.randint(-1, 2, m.B_T.shape, generator=g).float())
        merge_model(lota)
    return {"a: GPTQ": base.eval(), "b: GPTQ+LoRA": lora.eval(), "c: merged LoTA": lota.eval(),
            "d: merged, torch": KernelMode(lota.eval(), "torch")}, src.tokenizer


@torch.no_grad()
def gen_s(model, ids, new_tokens):
    t0 = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    return time.perf_counter() - t0


@torch.no_grad()
def prefill_s(model, ids):
    t0 = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    return time.perf_counter() - t0


def measure(models, prompts, prefill_ids, new_tokens, reps):
    """Interleaved: each repetition times every model once per measurement, so slow drifts of the
    machine (other processes, frequency) hit a, b and c alike; medians over the repetitions."""
    times = {name: {"b1": [], "b8": [], "prefill": []} for name in models}
    for _ in range(reps):
        for key, run in (("b1", lambda m: gen_s(m, prompts[1], new_tokens)),
                         ("b8", lambda m: gen_s(m, prompts[8], new_tokens)),
                         ("prefill", lambda m: prefill_s(m, prefill_ids))):
            for name, m in models.items():
                times[name][key].append(run(m))
    res = {}
    for name, t in times.items():
        res[name] = {"tok/s b1": new_tokens / statistics.median(t["b1"]),
                     "tok/s b8": 8 * new_tokens / statistics.median(t["b8"]),
                     "prefill s (8x512)": statistics.median(t["prefill"])}
    return res


@torch.no_grad()
def layer_pass_s(models, reps: int, dtypes: dict) -> dict[str, float]:
    """Median seconds to run one token through every quantized layer of each model (interleaved):
    the decode-time work of the layers alone, without generate()'s overhead and noise."""
    layers = {name: ([m for m in model.modules() if isinstance(m, QuantLinear)], getattr(model, "mode", None))
              for name, model in models.items()}
    xs = {}
    g = torch.Generator().manual_seed(2)
    for ls, _mode in layers.values():
        for m in ls:
            xs.setdefault(m.in_features, torch.randn(1, m.in_features, generator=g))
    times = {name: [] for name in models}
    for _ in range(reps):
        for name, (ls, mode) in layers.items():
            before = kernels.mode()
            kernels.set_mode(mode or before)
            t0 = time.perf_counter()
            for m in ls:
                m(xs[m.in_features].to(dtypes[name]))
            times[name].append(time.perf_counter() - t0)
            kernels.set_mode(before)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--bits", type=int, default=4, choices=(2, 3, 4))
    ap.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    args = ap.parse_args()
    torch.set_num_threads(2)
    built, _tok = build(args)
    models, dtypes = {}, {}
    for p in args.precision:
        dt = precision.DTYPES[p]
        for name, m in built.items():
            models[f"{name}@{p}"], dtypes[f"{name}@{p}"] = precision.cast_copy(m, dt), dt
    g = torch.Generator().manual_seed(1)
    prompts = {b: torch.randint(100, 40000, (b, args.prompt_len), generator=g) for b in (1, 8)}
    for m in models.values():  # warm-up
        gen_s(m, prompts[1], 4)
    prefill_ids = torch.randint(100, 40000, (8, 512), generator=g)
    res = measure(models, prompts, prefill_ids, args.new_tokens, args.reps)
    print(f"SmolLM2-135M RTN INT{args.bits} g64, CPU {torch.get_num_threads()} threads, greedy, {args.new_tokens} new tokens, "
          f"prompt {args.prompt_len}, median of {args.reps} interleaved repetitions")
    for name, r in res.items():
        print(f"  {name:20s} " + "  ".join(f"{k} {v:8.2f}" for k, v in r.items()))
    lp = layer_pass_s(models, 4 * args.reps, dtypes)
    for p in args.precision:
        a, b, c, d = (res[f"{k}@{p}"] for k in built)
        la, lb, lc, ld = (lp[f"{k}@{p}"] for k in built)
        print(f"{p}: one token through all quantized layers (median of {4 * args.reps} interleaved): "
              f"a {la * 1e3:.1f} ms, b {lb * 1e3:.1f} ms (base layers only), c {lc * 1e3:.1f} ms, d {ld * 1e3:.1f} ms; "
              f"c/a speed {la / lc:.3f}, c/d speed {ld / lc:.2f}")
        for key in a:
            better = (lambda x, y: x / y) if key.startswith("tok") else (lambda x, y: y / x)  # >1: c is faster
            print(f"{p}:  {key:18s} speed ratio c/b {better(c[key], b[key]):.2f}   c/a {better(c[key], a[key]):.2f}   "
                  f"c/d {better(c[key], d[key]):.2f}")
    if "fp32" in args.precision and "bf16" in args.precision:
        for k in built:
            print(f"{k}: bf16/fp32 decode speed at batch 1 {res[f'{k}@bf16']['tok/s b1'] / res[f'{k}@fp32']['tok/s b1']:.2f}x")


if __name__ == "__main__":
    main()
