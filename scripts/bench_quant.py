"""Benchmark the quantization core on SmolLM2-sized shapes, baseline and ours in one process.

    .venv/bin/python scripts/bench_quant.py        (or: make bench)

Prints, with ratios:
- QuantLinear forward (dequantize-then-matmul, the reference path) vs nn.Linear forward;
- vectorized GPTQ packing vs a per-code pure-Python packer (3-bit, the awkward layout);
- GPTQ vs round-to-nearest time for one 1536 -> 576 layer.
"""

from __future__ import annotations

import torch
from benchutil import median_time  # scripts/ is on sys.path when a script runs

from lotaqaf_cli.core.gptq import gptq_quantize
from lotaqaf_cli.core.qlinear import QuantLinear
from lotaqaf_cli.core.quant import pack_rows, rtn_quantize


def python_pack_column(codes: list[int], bits: int) -> list[int]:
    stream = 0
    for k, c in enumerate(codes):
        stream |= c << (k * bits)
    return [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(len(codes) * bits // 32)]


def main():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    d_in, d_out = 1536, 576
    W = torch.randn(d_out, d_in) * 0.02
    x = torch.randn(4, 128, d_in)

    lin = torch.nn.Linear(d_in, d_out, bias=False)
    lin.weight.data.copy_(W)
    q = QuantLinear.from_quantized(*rtn_quantize(W.t(), 4, 64), bits=4, group_size=64)
    with torch.no_grad():
        t_lin = median_time(lambda: lin(x))
        t_q = median_time(lambda: q(x))
    print(f"forward 4x128x{d_in}->{d_out}: nn.Linear {t_lin*1e3:.2f} ms, QuantLinear {t_q*1e3:.2f} ms, "
          f"ratio {t_q / t_lin:.2f}x")

    codes = torch.randint(0, 8, (d_in, 64))
    t_vec = median_time(lambda: pack_rows(codes, 3), reps=5)
    cols = [codes[:, j].tolist() for j in range(codes.shape[1])]
    t_py = median_time(lambda: [python_pack_column(c, 3) for c in cols], reps=3, warmup=1)
    print(f"3-bit pack {d_in}x64: pure Python {t_py*1e3:.1f} ms, vectorized {t_vec*1e3:.1f} ms, "
          f"speed-up {t_py / t_vec:.1f}x")

    X = torch.randn(4096, d_in)
    H = 2 / X.shape[0] * X.T @ X
    t_rtn = median_time(lambda: rtn_quantize(W.t(), 4, 64), reps=3, warmup=1)
    t_gptq = median_time(lambda: gptq_quantize(W, H, 4, 64), reps=3, warmup=1)
    print(f"quantize {d_out}x{d_in} 4-bit g64: RTN {t_rtn*1e3:.1f} ms, GPTQ {t_gptq*1e3:.1f} ms, "
          f"ratio {t_gptq / t_rtn:.1f}x")


if __name__ == "__main__":
    main()
