"""Stage `export`: a run's merged model in formats other engines load.

    lotaqaf export [run=DIR] --format gptq|gguf|hf16 [--allow-lossy]

gptq  the standard GPTQ checkpoint (no fractional zero points): exact when the run used
      adapter.offset_factor=none; otherwise the zero points must be rounded, which is refused
      unless --allow-lossy, and then the measured logit and perplexity change is printed.
gguf  llama.cpp GGUF (io/gguf_export.py): 4-bit layers map onto Q4_1 exactly up to fp16 rounding.
hf16  dequantized weights in the source architecture (safetensors), for any engine.
Reads <run>/merged/ (run `lotaqaf merge` first). Writes <run>/export-<format>/.
"""

from __future__ import annotations

import copy
import json

import torch
from torch import nn

from .. import ui
from ..core.perplexity import perplexity
from ..core.qlinear import QuantLinear, replace_module
from ..errors import LotaqafError
from ..io.checkpoint import atomic_dir, load_quantized, quantized_modules, save_quantized, write_json_atomic
from .merge import find_run, heldout_windows, probe_batch

FORMATS = ("gptq", "gguf", "hf16")




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
        replace_module(out, name, QuantLinear.from_quantized(q.codes, q.scales, z, q.g_idx, q.bits, q.group_size, q.bias))
    return out, n_frac


@torch.no_grad()
def compare(a: nn.Module, b: nn.Module, cfg, info) -> dict:
    probe = probe_batch(a.config.vocab_size)
    out = {"max_abs_logit_diff": (a(probe).logits.float() - b(probe).logits.float()).abs().max().item()}
    windows = heldout_windows(cfg, info)
    if windows is not None:
        pa, n = perplexity(a, windows)
        pb, _ = perplexity(b, windows)
        out["perplexity"] = {"merged": pa, "export": pb, "change": pb - pa, "tokens": n}
    return out


@torch.no_grad()
def run_export(run: str | None, fmt: str, allow_lossy: bool = False) -> dict:
    from omegaconf import OmegaConf

    if fmt not in FORMATS:
        raise LotaqafError(f"unknown export format '{fmt}'; valid: {', '.join(FORMATS)}")
    run_dir = find_run(run)
    merged_dir = run_dir / "merged"
    if not (merged_dir / "quantize_config.json").is_file():
        raise LotaqafError(f"{run_dir} has no merged model: run `lotaqaf merge run={run_dir}` first")
    out_dir = run_dir / f"export-{fmt}"
    if out_dir.exists():
        raise LotaqafError(f"{out_dir} already exists: remove it to export again")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    model, tok, info = load_quantized(merged_dir)
    qc = info["quantize_config"]
    report: dict = {"format": fmt, "source": str(merged_dir), "merged_hash": info["content_hash"]}

    if fmt == "gptq":
        plain, n_frac = rounded_zero_model(model)
        report["fractional_zero_points"] = n_frac
        if n_frac and not allow_lossy:
            raise LotaqafError(f"{n_frac} zero points are fractional (offset factor); plain GPTQ cannot hold them. "
                               "Train with adapter.offset_factor=none for an exact GPTQ export, or pass --allow-lossy")
        report.update(compare(model, plain, cfg, info))
        settings = {"bits": qc["bits"], "group_size": qc["group_size"], "act_order": qc.get("desc_act", False)}
        with atomic_dir(out_dir) as tmp:
            save_quantized(plain, tok, tmp, settings, {**qc.get("lotaqaf", {}), "exported_from": info["content_hash"]})
    elif fmt == "hf16":
        dense = dequantized_model(model)
        report.update(compare(model, dense, cfg, info))
        with atomic_dir(out_dir) as tmp:
            dense.config.quantization_config = None
            if hasattr(dense.config, "quantization_config"):
                del dense.config.quantization_config
            dense.save_pretrained(str(tmp), safe_serialization=True)
            if tok is not None:
                tok.save_pretrained(str(tmp))
    else:
        from ..io.gguf_export import export_gguf

        source = cfg.model.path
        from transformers import AutoModelForCausalLM

        with atomic_dir(out_dir) as tmp:
            report.update(export_gguf(model, source, tmp / "model.gguf", allow_lossy=allow_lossy))
            with ui.status("reading the GGUF file back with transformers ..."):
                back = AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file="model.gguf", dtype=torch.float32)
            report.update(compare(model, back.eval(), cfg, info))  # what an engine reading the file computes
    write_json_atomic(run_dir / f"export-{fmt}.json", report)
    ui.say(f"exported {fmt} to {out_dir}: " + json.dumps({k: v for k, v in report.items()
                                                          if k in ("max_abs_logit_diff", "perplexity",
                                                                   "max_weight_error")}))
    return report


