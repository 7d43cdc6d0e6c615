"""GPU figures for docs/results/gpu.md, on random-weight models with Llama-3.1-8B's shapes (a few decoder
layers built from a config in code; nothing is downloaded). scripts/gpu_check.sh runs it on a lent GPU.

    python scripts/bench_gpu.py --out OUT            # CUDA: the full set (a few minutes on an H200)
    python scripts/bench_gpu.py --dry-run --out OUT  # CPU: the same code on a tiny model, to check it runs

Reports, each baseline in the same process as what it is compared with:
- GPTQ: seconds per decoder layer (4-bit g64, act-order off, the recipe's quantizer).
- training: step time and peak memory of LoTA-QAF (r 64, omega 48, t-SignSGD) vs GPTQ + LoRA (r 64,
  AdamW) at the recipe's global batch (micro-batches accumulated), the steps interleaved.
- inference: decode tokens/s at batch 1 and prefill tokens/s of the merged LoTA-QAF model through the
  Triton kernel vs the same model with kernels=torch (dequantize, then matmul) vs the bf16 model.
- the decode kernel alone on the largest layer (4096 x 14336): achieved memory bandwidth (bytes it must
  read: packed codes, scales, zero points, x) as a fraction of a device-to-device copy's bandwidth
  measured here, and of the device's nominal bandwidth where known.
Writes OUT/gpu.json and OUT/gpu.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lotaqaf_kernels as kernels  # noqa: E402

from lotaqaf_cli.core.lora import attach_lora  # noqa: E402
from lotaqaf_cli.core.merge import merge_model  # noqa: E402
from lotaqaf_cli.core.qlinear import QuantLinear  # noqa: E402
from lotaqaf_cli.core.quant import rtn_quantize  # noqa: E402
from lotaqaf_cli.core.quantize_model import linear_layers, quantize_model  # noqa: E402
from lotaqaf_cli.core.ternary import TernaryLinear, attach_ternary_adapters  # noqa: E402
from lotaqaf_cli.core.tsignsgd import TSignSGD  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA31_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                  vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
            max_position_embeddings=512)
NOMINAL_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}


def build(shape: dict, layers: int, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=False, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def gptq_per_layer(shape, n_layers, device, dtype, calib_shape) -> dict:
    model = build(shape, n_layers, device, dtype)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, shape["vocab_size"], calib_shape, generator=g)]
    sync(device)
    t0 = time.perf_counter()
    quantize_model(model, calib, bits=4, group_size=64, method="gptq", device=device)
    sync(device)
    return {"seconds_per_layer": (time.perf_counter() - t0) / n_layers, "calib_tokens": calib_shape[0] * calib_shape[1]}


def rtn_base(model):
    """Every decoder linear replaced by a 4-bit g64 round-to-nearest QuantLinear (fast; speed does not
    depend on how the codes were chosen)."""
    for name, lin in linear_layers(model).items():
        codes, s, z, gi = rtn_quantize(lin.weight.detach().float().t(), 4, 64)
        q = QuantLinear.from_quantized(codes, s, z, gi, 4, 64).to(lin.weight.device)
        owner, _, child = name.rpartition(".")
        setattr(model.get_submodule(owner), child, q)
    return model


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def train_steps(base, device, global_batch, micro, seq, steps, vocab) -> dict:
    methods = {}
    for method in ("lora", "lota"):
        model = copy.deepcopy(base)
        model.requires_grad_(False)
        if method == "lota":
            attach_ternary_adapters(model, 64, 48, "group", TARGETS, generator=torch.Generator().manual_seed(0))
            params = [p for n, p in model.named_parameters() if n.endswith(("A_T", "B_T"))]
            opt = TSignSGD(params, total_steps=steps + 1)
        else:
            attach_lora(model, "lora", 64, 128, 0.0, TARGETS, dtype=torch.float32)
            params = [p for n, p in model.named_parameters() if "lora_" in n]
            opt = torch.optim.AdamW(params, lr=1e-5)
        model.to(device).train()
        methods[method] = (model, params, opt)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, vocab, (micro, seq), generator=g).to(device) for _ in range(global_batch // micro)]

    def step(method):
        model, params, opt = methods[method]
        for ids in batches:
            (model(input_ids=ids, labels=ids).loss / len(batches)).backward()
        if method == "lora":
            torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = {m: [] for m in methods}
    peaks = {m: 0.0 for m in methods}
    for k in range(steps + 1):  # step 0: warm-up (Triton compiles); the order alternates
        for m in (["lora", "lota"] if k % 2 == 0 else ["lota", "lora"]):
            peak_reset(device)
            sync(device)
            t0 = time.perf_counter()
            step(m)
            sync(device)
            if k:
                times[m].append(time.perf_counter() - t0)
                peaks[m] = max(peaks[m], peak_gb(device))
    out = {m: {"step_s": statistics.median(times[m]), "peak_gb": peaks[m]} for m in methods}
    out["lota_over_lora_time"] = out["lota"]["step_s"] / out["lora"]["step_s"]
    out["tokens_per_step"] = global_batch * seq
    return out


@torch.no_grad()
def inference(base, bf16_model, device, prompt, new_tokens, prefill_shape, vocab) -> dict:
    merged = copy.deepcopy(base)
    attach_ternary_adapters(merged, 64, 48, "group", TARGETS, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    for m in merged.modules():
        if isinstance(m, TernaryLinear):
            m.B_T.copy_(torch.randint(-1, 2, m.B_T.shape, generator=g).to(m.B_T))
    merge_model(merged)
    merged.to(device)
    ids = torch.randint(0, vocab, (1, prompt), generator=g).to(device)
    pre = torch.randint(0, vocab, prefill_shape, generator=g).to(device)

    def decode(model):
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                       max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)

    rows = {}
    before = kernels.mode()
    for name, model, mode in (("merged LoTA-QAF (kernels=auto: Triton on CUDA)", merged, "auto"),
                              ("merged LoTA-QAF (kernels=torch: dequantize + matmul)", merged, "torch"),
                              ("bf16 (no quantization)", bf16_model, "auto")):
        kernels.set_mode(mode)
        d = timed(lambda m=model: decode(m), device, reps=3)
        p = timed(lambda m=model: m(input_ids=pre, use_cache=False), device, reps=3)
        rows[name] = {"decode_tok_s": new_tokens / d, "prefill_tok_s": pre.numel() / p}
    kernels.set_mode(before)
    return rows


def kernel_bandwidth(device, d_in=4096, d_out=14336) -> dict:
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 16, (d_in, d_out), generator=g)
    q = QuantLinear.from_quantized(codes, torch.rand(d_in // 64, d_out, generator=g) * 0.01,
                                   torch.rand(d_in // 64, d_out, generator=g) * 15, torch.arange(d_in) // 64, 4, 64).to(device)
    x = torch.randn(1, d_in, generator=g).to(device, torch.bfloat16)
    out = {"shape": [d_in, d_out], "rows": 1}
    for mode in ("auto", "torch"):
        kernels.set_mode(mode)
        out[f"{mode}_us"] = timed(lambda: q(x), device, reps=50, warmup=3) * 1e6
    kernels.set_mode("auto")
    moved = q.qweight.nbytes + q.scales.nbytes + q.zeros.nbytes + q.g_idx.nbytes + x.nbytes + d_out * x.element_size()
    out["bytes"] = moved
    out["achieved_gb_s"] = moved / (out["auto_us"] * 1e-6) / 1e9
    buf = torch.empty(2**28 if device.type == "cuda" else 2**22, dtype=torch.uint8, device=device)  # 256 MiB
    dst = torch.empty_like(buf)
    copy_s = timed(lambda: dst.copy_(buf), device, reps=10)
    out["copy_gb_s"] = 2 * buf.nbytes / copy_s / 1e9  # read + write
    out["fraction_of_copy"] = out["achieved_gb_s"] / out["copy_gb_s"]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    nominal = next((v for k, v in NOMINAL_GBPS.items() if k in name), None)
    out["device"] = name
    out["fraction_of_nominal"] = None if nominal is None else out["achieved_gb_s"] / nominal
    return out


def markdown(res: dict) -> str:
    a = res["args"]
    lines = [f"# GPU check ({res['device']}, {res['date']})", "",
             f"Random weights with {res['shapes']} shapes, {a['layers']} decoder layers; torch {res['torch']}, "
             f"triton {res['triton']}; `{res['command']}`.", "",
             "| what | figure |", "|---|---|",
             f"| GPTQ 4-bit g64, seconds per decoder layer ({res['gptq']['calib_tokens']} calibration tokens) | "
             f"{res['gptq']['seconds_per_layer']:.2f} |"]
    t = res["train"]
    for m in ("lora", "lota"):
        lines.append(f"| train step, {'LoTA-QAF (r 64, omega 48)' if m == 'lota' else 'GPTQ + LoRA (r 64)'}, "
                     f"{t['tokens_per_step']} tokens: seconds / peak GiB | {t[m]['step_s']:.3f} / {t[m]['peak_gb']:.1f} |")
    lines.append(f"| train step time LoTA-QAF / LoRA | {t['lota_over_lora_time']:.2f} |")
    for name, r in res["inference"].items():
        lines.append(f"| {name}: decode tok/s at batch 1 / prefill tok/s | {r['decode_tok_s']:.1f} / {r['prefill_tok_s']:.0f} |")
    b = res["bandwidth"]
    frac_nom = "n/a" if b["fraction_of_nominal"] is None else f"{b['fraction_of_nominal']:.2f}"
    lines += [f"| decode kernel, {b['shape'][0]}x{b['shape'][1]} 4-bit, 1 row: us (Triton / torch) | "
              f"{b['auto_us']:.1f} / {b['torch_us']:.1f} |",
              f"| its achieved bandwidth GB/s; fraction of a measured copy / of nominal | {b['achieved_gb_s']:.0f}; "
              f"{b['fraction_of_copy']:.2f} / {frac_nom} |", ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_out")
    ap.add_argument("--dry-run", action="store_true", help="CPU, a tiny model: check that every part runs")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64, help="global batch (the llama3_mmlu recipe's)")
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    if args.dry_run:
        device, shape, dtype = torch.device("cpu"), TINY, torch.float32
        args.batch, args.micro, args.seq, args.steps = 2, 1, 32, 1
        calib, prompt, new, prefill = (2, 32), 8, 4, (2, 32)
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_gpu.py: no CUDA device (use --dry-run on CPU)")
        device, shape, dtype = torch.device("cuda"), LLAMA31_8B, torch.bfloat16
        calib, prompt, new, prefill = (32, 2048), 64, 128, (8, 2048)
    t_start = time.time()
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
           "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
           "triton": getattr(sys.modules.get("triton"), "__version__", None) if kernels.triton_available() else None,
           "command": "python scripts/bench_gpu.py " + " ".join(sys.argv[1:]), "args": vars(args),
           "shapes": "tiny (dry run)" if args.dry_run else "Llama-3.1-8B"}
    if res["triton"] is None and kernels.triton_available():
        import triton
        res["triton"] = triton.__version__
    res["gptq"] = gptq_per_layer(shape, args.layers, device, dtype, calib)
    print(f"GPTQ: {res['gptq']['seconds_per_layer']:.2f} s per layer", flush=True)
    base = rtn_base(build(shape, args.layers, device, dtype))
    res["train"] = train_steps(base, device, args.batch, args.micro, args.seq, args.steps, shape["vocab_size"])
    print(f"train: {json.dumps(res['train'])}", flush=True)
    bf16_model = build(shape, args.layers, device, dtype)
    res["inference"] = inference(base, bf16_model, device, prompt, new, prefill, shape["vocab_size"])
    print(f"inference: {json.dumps(res['inference'])}", flush=True)
    res["bandwidth"] = kernel_bandwidth(device, *((4096, 14336) if device.type == "cuda" else (128, 256)))
    print(f"bandwidth: {json.dumps(res['bandwidth'])}", flush=True)
    res["seconds"] = round(time.time() - t_start, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "gpu.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
