"""Stage `export`: a merged model in formats other engines load.

    convert(merged, fmt, allow_lossy)   -> (the model as the format holds it, report)   gptq | hf16
    exact_formats(merged, gguf_source)  -> the formats that hold it exactly (what refusals suggest)
    compare(merged, exported, windows)  -> max |logit difference| (and perplexities)

gptq  the standard GPTQ checkpoint (no fractional zero points): exact when the run used
      adapter.offset_granularity=none; otherwise the zero points must be rounded, which is refused
      unless export.allow_lossy, and then the measured logit and perplexity change is reported.
gguf  llama.cpp GGUF (io/gguf_export.py writes it from the merged model itself; 4-bit layers map onto
      Q4_1 exactly up to fp16 rounding); the command layer reads the file back for compare().
hf16  dequantized weights in the source architecture (safetensors), for any engine.
Takes the recipe's `export` section; the command layer writes the files.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..core.merge import probe_batch
from ..core.perplexity import perplexity
from ..core.qlinear import QuantLinear, quantized_modules, replace_module
from ..errors import LotaqafError
from ..io.gguf_export import q4_1_exact


def dequantized_model(model: nn.Module, dtype=torch.float32) -> nn.Module:
    """Every QuantLinear replaced by a plain nn.Linear holding its dequantized weight."""
    out = copy.deepcopy(model)
    for name, q in quantized_modules(out).items():
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(q.dequantize(torch.float32).t())
            if q.bias is not None:
                lin.bias.copy_(q.bias)
        replace_module(out, name, lin)
    return out


def rounded_zero_model(model: nn.Module) -> tuple[nn.Module, int]:
    """The same codes and scales with integer zero points (what plain GPTQ can hold)."""
    out = copy.deepcopy(model)
    n_frac = 0
    for name, q in quantized_modules(out).items():
        z = q.zeros.round().clamp(0, (1 << q.bits) - 1)
        n_frac += int((z != q.zeros).sum())
        replace_module(out, name, QuantLinear.from_packed(q.qweight, q.in_features, q.scales, z, q.g_idx, q.bits,
                                                         q.group_size, q.bias))
    return out, n_frac


@torch.no_grad()
def compare(a: nn.Module, b: nn.Module, windows: torch.Tensor | None = None) -> dict:
    probe = probe_batch(a.config.vocab_size)
    out = {"max_abs_logit_diff": (a(probe).logits.float() - b(probe).logits.float()).abs().max().item()}
    if windows is not None:
        pa, n = perplexity(a, windows)
        pb, _ = perplexity(b, windows)
        out["perplexity"] = {"merged": pa, "export": pb, "change": pb - pa, "tokens": n}
    return out


def exact_formats(model: nn.Module, gguf_source: bool = True) -> list[str]:
    """The export formats that hold this merged model exactly (what a refusal may suggest): gguf for
    4-bit layers in contiguous groups of a multiple of 32 (from a GGUF source), gptq without
    fractional zero points, hf16 always."""
    qmods = quantized_modules(model).values()
    out = ["gguf"] if gguf_source and all(q4_1_exact(q) for q in qmods) else []
    if all(torch.equal(q.zeros, q.zeros.round()) for q in qmods):
        out.append("gptq")
    return out + ["hf16"]


@torch.no_grad()
def convert(model: nn.Module, fmt: str, allow_lossy: bool = False, exact: list[str] | None = None):
    """gptq: integer zero points (refused if any is fractional, unless allow_lossy; the refusal names
    the formats in ``exact``, default :func:`exact_formats`); hf16: dense."""
    if fmt == "gptq":
        plain, n_frac = rounded_zero_model(model)
        if n_frac and not allow_lossy:
            raise LotaqafError(f"{n_frac} zero points are fractional (offset factor); plain GPTQ cannot hold them. "
                               f"Exact instead: --format {' or '.join(f for f in exact or exact_formats(model) if f != 'gptq')}"
                               " (or --allow-lossy to round them and measure the change; or train with "
                               "adapter.offset_granularity=none)")
        return plain, {"fractional_zero_points": n_frac}
    if fmt == "hf16":
        return dequantized_model(model), {}
    raise ValueError(fmt)
