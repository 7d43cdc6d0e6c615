"""Training-step cost of LoTA-QAF vs the GPTQ + LoRA and QA-LoRA baselines, on one quantized base,
in one process.

    .venv/bin/python scripts/bench_train.py                 # SmolLM2-135M, RTN 4-bit g64 base
    .venv/bin/python scripts/bench_train.py --layers 6      # only the first 6 decoder layers (quicker)
    .venv/bin/python scripts/bench_train.py --breakdown     # also: where the time of a step goes
    .venv/bin/python scripts/bench_train.py --precision bf16    # one precision (default: fp32 and bf16)

For each method and precision (precision.py: the base's non-quantized tensors and the activations in
float32 or bf16; adapters' master weights float32): attach adapters to a copy of the same quantized
base; then every (method, precision) takes its steps interleaved (step k of each before step k + 1 of any, the order rotating), each timed as
forward + backward + optimizer step, with its peak memory above the memory before it (CPU: VmHWM reset
through /proc/self/clear_refs; CUDA: torch.cuda.max_memory_allocated). Prints the medians, the
lota/lora ratio of every interleaved step and of the medians.

The lota/lora ratios are printed per precision. --breakdown times each part of the adapter layers' work in isolation, on the model's own layer
shapes and token count, summed over all adapted layers: seconds per step for lota and lora.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections import Counter

import lotaqaf_kernels as kernels
import torch
from benchutil import median_time, reset_host_peak, status_kb  # scripts/ is on sys.path when a script runs

from lotaqaf_cli import precision
from lotaqaf_cli.core.lora import attach_lora
from lotaqaf_cli.core.qlinear import QuantLinear
from lotaqaf_cli.core.quantize_model import quantize_model
from lotaqaf_cli.core.ternary import SIXTEEN_BIT, TernaryLinear, attach_ternary_adapters
from lotaqaf_cli.core.tsignsgd import TSignSGD
from lotaqaf_cli.io.models import load_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    reset_host_peak()


def peak_mb(rss_before_kb: int) -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return (status_kb("VmHWM") - rss_before_kb) / 1024


def make_step(base, method: str, total_steps: int):
    """(one optimizer step of ``method`` on its own copy of ``base``, the trainable parameter count)."""
    model = copy.deepcopy(base)
    model.requires_grad_(False)
    if method == "lota":
        attach_ternary_adapters(model, 64, 48, "group", TARGETS, generator=torch.Generator().manual_seed(0))
        params = [p for n, p in model.named_parameters() if n.endswith(("A_T", "B_T"))]
        opt = TSignSGD(params, total_steps=total_steps)
    else:
        attach_lora(model, method, 16, 32, 0.0, TARGETS)
        params = [p for n, p in model.named_parameters() if "lora_" in n]
        opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step(batch):
        loss = model(**batch).loss
        loss.backward()
        if method != "lota":
            torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def bench(bases: dict, batch: dict, steps: int, warmup: int) -> dict:
    """``bases``: label -> (base model, method). Interleaved: step k of every label runs before step k + 1
    of any (the order rotates), so a job that starts mid-run slows all alike. Per step: wall time, and peak
    memory above the memory before that step (CPU: VmHWM reset through /proc/self/clear_refs; CUDA: max
    allocated)."""
    methods = list(bases)
    runs = {m: make_step(b, method, steps + warmup) for m, (b, method) in bases.items()}
    times = {m: [] for m in methods}
    peaks = {m: 0.0 for m in methods}
    for k in range(warmup + steps):
        order = methods[k % len(methods):] + methods[:k % len(methods)]
        for m in order:
            rss0 = status_kb("VmRSS")
            reset_peak()
            t0 = time.perf_counter()
            runs[m][0](batch)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if k >= warmup:
                times[m].append(time.perf_counter() - t0)
                peaks[m] = max(peaks[m], peak_mb(rss0))
    return {m: {"median_s": statistics.median(times[m]), "peak_mb": peaks[m], "trainable": runs[m][1],
                "times": times[m]} for m in methods}


@torch.no_grad()
def breakdown(base, tokens: int, dtype=torch.float32) -> dict[str, tuple[float, float]]:
    """{component: (lota seconds per step, lora seconds per step)} summed over the adapted layers.

    lota's layer (core/ternary.py) dequantizes twice at float32 (forward, and backward to rebuild W_eff
    for the input gradient) and once at bf16 (the forward's 16-bit W_eff is kept), finds the markers
    and the offset factor once per forward, and needs the full weight gradient G = x^T dy for the
    straight-through estimator (or, with the rank below half the group size, forms the gradients group
    by group); LoRA's frozen base dequantizes once (autograd keeps W) and its gradient only flows
    through the rank-r bottleneck. ``dtype``: the activations' (the weights are dequantized
    in float32 and rounded to it, as core/qlinear does; the straight-through statistics stay float32)."""
    layers = {}
    for m in base.modules():
        if isinstance(m, QuantLinear):
            layers.setdefault((m.in_features, m.out_features), m)
    counts = Counter((m.in_features, m.out_features) for m in base.modules() if isinstance(m, QuantLinear))
    g = torch.Generator().manual_seed(0)
    out: dict[str, list[float]] = {}

    def add(name, lota_s, lora_s, n):
        acc = out.setdefault(name, [0.0, 0.0])
        acc[0] += lota_s * n
        acc[1] += lora_s * n

    for shape, layer in layers.items():
        n = counts[shape]
        d_in, d_out = shape
        ta = TernaryLinear(copy.deepcopy(layer), 64, 48, generator=g)
        ta.B_T.copy_(torch.randint(-1, 2, ta.B_T.shape, generator=g).float())
        x, dy = torch.randn(tokens, d_in, generator=g).to(dtype), torch.randn(tokens, d_out, generator=g).to(dtype)
        w = layer.dequantize(dtype)
        A, B = torch.randn(d_in, 16, generator=g).to(dtype), torch.randn(16, d_out, generator=g).to(dtype)
        t_dq = median_time(lambda: layer.dequantize(dtype))  # noqa: B023
        add("forward x @ W", median_time(lambda: x @ w), median_time(lambda: x @ w), n)  # noqa: B023
        add("input gradient dy @ W^T", median_time(lambda: dy @ w.t()), median_time(lambda: dy @ w.t()), n)  # noqa: B023
        add("dequantize W (lota 2x at fp32, else 1x; lora 1x)", (1 if dtype in SIXTEEN_BIT else 2) * t_dq, t_dq, n)
        add("markers + offset factor (A_T @ B_T)", median_time(lambda: ta._markers_mu(ta.A_T, ta.B_T)), 0.0, n)  # noqa: B023
        if ta._per_group_grads_pay(tokens):  # what the layer's backward does at this rank and group size
            add("weight gradient G = x^T dy", 0.0, 0.0, n)
            add("straight-through grads of A_T, B_T", median_time(
                lambda: ta._grads_per_group(x, dy, ta.A_T.detach(), ta.B_T.detach())), 0.0, n)  # noqa: B023
        else:
            t_g = median_time(lambda: x.t() @ dy)  # noqa: B023
            add("weight gradient G = x^T dy", t_g, 0.0, n)
            add("straight-through grads of A_T, B_T", median_time(
                lambda: ta._grads_dense(x, dy, ta.A_T.detach(), ta.B_T.detach())) - t_g, 0.0, n)  # noqa: B023

        def lora_path():
            h = x @ A  # noqa: B023
            dh = dy @ B.t()  # noqa: B023
            return h @ B, h.t() @ dy, x.t() @ dh, dh @ A.t()  # noqa: B023

        add("LoRA path (x A B and its gradients)", 0.0, median_time(lora_path), n)
    return {k: (v[0], v[1]) for k, v in out.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=0, help="keep only the first N decoder layers (0 = all)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--breakdown", action="store_true", help="also time each part of the adapter layers")
    ap.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    args = ap.parse_args()
    torch.set_num_threads(2)
    src = load_model("embedded:smollm2")
    base = src.model
    if args.layers:
        base.model.layers = base.model.layers[: args.layers]
        base.config.num_hidden_layers = args.layers
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(100, 40000, (4, 64), generator=g)
    quantize_model(base, [calib], bits=4, group_size=64, method="rtn")
    ids = torch.randint(100, 40000, (args.batch, args.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    base.to(dev)
    batch = {k: v.to(dev) for k, v in batch.items()}
    print(f"SmolLM2-135M ({len(base.model.layers)} layers), RTN INT4 g64 base, batch {args.batch} x {args.seq} "
          f"tokens, {dev}, median of {args.steps} interleaved steps after {args.warmup} warm-up, kernels={kernels.mode()}")
    methods = ["lora", "qalora", "lota"]
    casts = {p: precision.cast_(copy.deepcopy(base), precision.DTYPES[p]) for p in args.precision}
    res = bench({f"{m}@{p}": (casts[p], m) for p in args.precision for m in methods}, batch, args.steps, args.warmup)
    for m, r in res.items():
        print(f"  {m:12s} step {r['median_s']:.3f} s   peak +{r['peak_mb']:.0f} MB   trainable {r['trainable']:,}")
    for p in args.precision:
        lo, lota = res[f"lora@{p}"], res[f"lota@{p}"]
        ratios = [a / b for a, b in zip(lota["times"], lo["times"], strict=True)]
        print(f"{p}: lota/lora per interleaved step: {' '.join(f'{r:.2f}' for r in ratios)}")
        print(f"{p}: lota/lora: time {lota['median_s'] / lo['median_s']:.2f}x, memory "
              f"{lota['peak_mb'] / max(lo['peak_mb'], 1e-9):.2f}x  (paper's implementation: 1.14-1.25x time, "
              f"1.03-1.06x memory)")
    if "fp32" in casts and "bf16" in casts:
        for m in methods:
            print(f"{m}: fp32/bf16 step time {res[f'{m}@fp32']['median_s'] / res[f'{m}@bf16']['median_s']:.2f}x")
    if args.breakdown:
        for p in args.precision:
            parts = breakdown(base, args.batch * args.seq, precision.DTYPES[p])
            lo, lota = res[f"lora@{p}"], res[f"lota@{p}"]
            print(f"{p}: where a step's adapter-layer time goes (isolated ops, {args.batch * args.seq} tokens, "
                  "summed over the adapted layers, seconds):")
            print(f"  {'component':48s} {'lota':>7s} {'lora':>7s}")
            for k, (a, b) in parts.items():
                print(f"  {k:48s} {a:7.3f} {b:7.3f}")
            ta, tb = sum(a for a, _ in parts.values()), sum(b for _, b in parts.values())
            print(f"  {'sum':48s} {ta:7.3f} {tb:7.3f}")
            print(f"  {'rest of the step (attention, norms, lm_head, loss, optimizer)':48s} "
                  f"{lota['median_s'] - ta:7.3f} {lo['median_s'] - tb:7.3f}")


if __name__ == "__main__":
    main()
