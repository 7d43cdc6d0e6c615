"""Forward+backward cost of one TernaryLinear vs a naive dense-autograd LoTA layer and a LoRA baseline.

SmolLM2-like shape (D_in 576, D_out 1536), r 64 (omega 48), group 64, 4 bits, x = 4 x 128 tokens,
fp32 on CPU with 2 threads. Reports the median step time over --steps steps after warm-up and the
bytes autograd saves for backward (the input x included; parameters and buffers excluded).

    .venv/bin/python scripts/bench_ternary.py [--steps 20] [--warmup 3] [--omega 48]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from lotaqaf_cli.core.qlinear import QuantLinear
from lotaqaf_cli.core.quant import rtn_quantize
from lotaqaf_cli.core.ternary import TernaryLinear, marker_entries, ternarize

D_IN, D_OUT, RANK, OMEGA, GS, BITS, BATCH, SEQ, LORA_R = 576, 1536, 64, 48.0, 64, 4, 4, 128, 16


class NaiveTernary(nn.Module):
    """Dense W_eff built with autograd every step (what the reference code does)."""

    def __init__(self, layer: TernaryLinear):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        lt, base = self.layer, self.layer.base
        dW = lt.A_T @ lt.B_T
        # the layer's own sparse markers (boundary check on its packed codes), made dense here
        idx, val, _ = marker_entries(dW.detach(), lt.omega, base.qweight, base.bits)
        w_hat = torch.zeros_like(dW)
        w_hat.view(-1)[idx] = val.to(dW.dtype)
        w_ste = dW + (w_hat - dW).detach()
        R = dW - lt.omega * w_hat
        mu = R.view(-1, GS, D_OUT).mean(dim=1) / lt.omega
        g = base.g_idx.long()
        w = base.scales[g] * (base.codes.float() - base.zeros[g] + w_ste + mu[g])
        return x @ w + base.bias


class LoRA(nn.Module):
    def __init__(self, base: QuantLinear, r: int):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.randn(D_IN, r) / r**0.5)
        self.B = nn.Parameter(torch.randn(r, D_OUT) * 1e-3)
        self.scaling = 2.0  # alpha = 2r

    def forward(self, x):
        return self.base(x) + (x @ self.A) @ self.B * self.scaling


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward, parameters and buffers excluded
    (they exist anyway); the input x is included (every variant saves it)."""
    skip = {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    y.sum().backward()
    return sum(seen.values())


def time_steps(modules: dict[str, nn.Module], x, dy, steps: int, warmup: int) -> dict[str, list[float]]:
    """fwd+bwd seconds per module and step; the modules take turns so that load from other
    processes hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in modules}
    for i in range(warmup + steps):
        for name, module in modules.items():
            for p in module.parameters():
                p.grad = None
            x.grad = None
            t0 = time.perf_counter()
            module(x).backward(dy)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--omega", type=float, default=OMEGA, help="marker threshold (48 = 0.75 r: markers rarely fire)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)

    w = torch.randn(D_IN, D_OUT, generator=gen) * 0.02
    codes, scales, zeros, g_idx = rtn_quantize(w, BITS, GS)
    base = QuantLinear.from_quantized(codes, scales, zeros, g_idx, BITS, GS,
                                      bias=torch.randn(D_OUT, generator=gen) * 0.01)
    ours = TernaryLinear(base, RANK, args.omega, "group", generator=gen)
    with torch.no_grad():  # a trained-looking B_T so every path does its full work
        ours.B_T.copy_(ternarize(torch.randn(RANK, D_OUT, generator=gen)))
    naive = NaiveTernary(ours)
    lora = LoRA(base, LORA_R)

    x = torch.randn(BATCH, SEQ, D_IN, generator=gen, requires_grad=True)
    dy = torch.randn(BATCH, SEQ, D_OUT, generator=gen)

    with torch.no_grad():  # same numbers from both LoTA paths
        err = float((ours(x) - naive(x)).abs().max())

    modules = {"ours": ours, "naive": naive, "lora": lora}
    times = time_steps(modules, x, dy, args.steps, args.warmup)
    results = {name: (statistics.median(times[name]), saved_bytes(m, x)) for name, m in modules.items()}

    t_rebuild = []
    with torch.no_grad():
        for _ in range(args.steps):
            t0 = time.perf_counter()
            ours._effective(ours.A_T, ours.B_T)
            t_rebuild.append(time.perf_counter() - t0)

    st = ours.marker_stats()
    print(f"shape D_in={D_IN} D_out={D_OUT} r={RANK} omega={args.omega} gs={GS} bits={BITS} "
          f"x={BATCH}x{SEQ} fp32, threads={torch.get_num_threads()}, steps={args.steps}")
    print(f"markers non-zero: {(st['plus'] + st['minus']) / st['total']:.2e}   max |ours - naive| = {err:.2e}")
    for name, (t, b) in results.items():
        print(f"{name:6s} fwd+bwd median {t * 1e3:8.2f} ms (min {min(times[name]) * 1e3:7.2f})   "
              f"saved for backward {b / 2**20:6.2f} MiB")
    print(f"W_eff rebuild (dW, markers, mu, W_eff) median {statistics.median(t_rebuild) * 1e3:.2f} ms")
    (to, bo), (tn, bn), (tl, bl) = results["ours"], results["naive"], results["lora"]
    print(f"time  ours/naive {to / tn:.3f}   ours/lora {to / tl:.3f}   (medians)")
    print(f"saved ours/naive {bo / bn:.3f}   ours/lora {bo / bl:.3f}")


if __name__ == "__main__":
    main()
