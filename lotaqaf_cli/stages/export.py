"""Stage `export`: a merged model in formats other engines load.

    write(merged, fmt, tmp, cfg.export, ...)  -> (the model as the files hold it, has an offset branch);
                                                 every format's writer, the files under tmp
    convert(merged, fmt, allow_lossy, ...)    -> (gptq / hf16 model, offset branches, report): what write saves
    exact_formats(merged)                     -> the formats that hold it exactly (what refusals suggest)
    compare(merged, held, windows)            -> max |logit difference| (and perplexities)
    lora_branch_model(adapted), write_lora(...) a LoRA / QA-LoRA run unmerged (export.source=adapter): its GPTQ
                                                 base + the adapter as a PEFT LoRA, the gptq layout below
    write_qlora(adapted, source, ...)         a QLoRA run (quant=nf4, export.source=adapter, --format hf16): the
                                                 16-bit source, NF4 settings for bitsandbytes, the LoRA in PEFT

gptq  a standard GPTQ checkpoint (integer zero points). With the offset factor the merged zero points
      z' are fractional; the export then rounds them to integers z and adds the difference back as a
      standard LoRA branch (the "offset branch"): x @ W' = x @ W_gptq + groupsum(x) @ (s * (z - z')),
      lora_A [G, D_in] the 0/1 group indicator, lora_B [D_out, G] = (s * (z - z'))^T, rank G, alpha G.
      `export.offset_branch=false` rounds without the branch (lossy: refused unless export.allow_lossy).
gguf  llama.cpp GGUF (io/gguf_export.py writes it from the merged model itself; 2-, 3- and 4-bit
      layers map onto Q4_1 exactly up to fp16 rounding of the block minimum).
torchao  the merged codes with float zero points in torchao's layout (io/torchao_export.py).
hf16  dequantized weights in the source architecture (safetensors), for any engine.
Takes the recipe's `export` section; the command layer names the directory and runs the engines
(serving/).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from ..core.lora import LoRALinear, QALoRALinear
from ..core.merge import compare_models
from ..core.nf4 import is_nf4
from ..core.qlinear import QuantLinear, dequantized_model, quantized_modules, replace_module
from ..errors import LotaqafError
from ..io.checkpoint import save_quantized
from ..io.gguf_export import export_gguf, q4_1_exact, stored_model
from ..io.offset_lora import save_offset_lora
from ..io.torchao_export import contiguous_groups, export_torchao


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


def offset_branch(q: QuantLinear) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The LoRA pair (A [G, D_in], B [D_out, G], float32) that restores a layer's fractional zero points
    z' on top of integer ones z = round(z'): s * (code - z') = s * (code - z) + s * (z - z'), so
    x @ W'^T = x @ W_gptq^T + (x @ A^T) @ B^T with A[g, i] = [g_idx[i] == g], B = (s * (z - z'))^T.
    None when the zero points are integers already."""
    z = q.zeros.round().clamp(0, (1 << q.bits) - 1)
    if torch.equal(z, q.zeros):
        return None
    groups = q.scales.shape[0]
    a = (q.g_idx.long().unsqueeze(0) == torch.arange(groups).unsqueeze(1)).float()
    b = (q.scales.double() * (z.double() - q.zeros.double())).t().float()
    return a, b


class OffsetBranchLinear(nn.Module):
    """A GPTQ layer (integer zero points) plus its offset branch: what GPTQ engine + LoRA compute."""

    def __init__(self, base: QuantLinear, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("lora_A", a)
        self.register_buffer("lora_B", b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t().to(x.dtype)) @ self.lora_B.t().to(x.dtype)


def offset_branch_model(model: nn.Module) -> tuple[nn.Module, dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """(the GPTQ model with integer zeros; the offset branches by layer name; their cost: extra
    parameters, and multiply-adds per token as a fraction of the quantized layers')."""
    plain, n_frac = rounded_zero_model(model)
    branches, extra, weights = {}, 0, 0
    for name, q in quantized_modules(model).items():
        weights += q.in_features * q.out_features
        pair = offset_branch(q)
        if pair is not None:
            branches[name] = pair
            extra += pair[0].numel() + pair[1].numel()
    return plain, branches, {"fractional_zero_points": n_frac, "offset_branch_layers": len(branches),
                             "offset_branch_parameters": extra, "quantized_weights": weights,
                             "offset_branch_macs_per_token_ratio": extra / max(weights, 1)}


def lora_branch_model(model: nn.Module) -> tuple[nn.Module, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """A LoRA or QA-LoRA adapter model as what a GPTQ engine with PEFT serves: (its base, the adapter as
    standard LoRA pairs A [r, D_in], B [D_out, r] with the scaling folded into B). QA-LoRA's pooled input
    is a LoRA whose A repeats each group's row divided by the group's size."""
    plain = copy.deepcopy(model)
    branches = lora_pairs(plain)
    for name in branches:
        replace_module(plain, name, plain.get_submodule(name).base)
    return plain, branches


def lora_pairs(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every LoRA-type layer of ``model`` as a standard LoRA pair (A [r, D_in], B [D_out, r], scaling in B)."""
    branches = {}
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
        a = m.lora_A.detach().float()
        if isinstance(m, QALoRALinear):
            g = m.base.g_idx.long()
            a = a[g] / m.group_counts[g, None]
        branches[name] = (a.t().contiguous(), (m.lora_B.detach().float() * m.scaling).t().contiguous())
    return branches


def write_qlora(adapted: nn.Module, source: nn.Module, tokenizer, tmp: Path, final_dir: Path, blocksize: int,
                report: dict) -> tuple[nn.Module, bool]:
    """A QLoRA run as it is served: the 16-bit source weights, which bitsandbytes quantizes to NF4 as
    transformers loads them (the settings in lotaqaf_nf4.json: the same codes as the run's NF4 base), and the LoRA
    as a PEFT adapter in offset_lora/. Returns the model the files give (the adapter model itself) and True."""
    if getattr(source, "hf_quantizer", None) is not None:  # a GGUF source, dequantized to float as transformers
        source.hf_quantizer = None                        # loaded it: its weights save as a plain checkpoint
        if hasattr(source.config, "quantization_config"):
            del source.config.quantization_config
    source.save_pretrained(str(tmp), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    skip = sorted({n.rsplit(".", 1)[-1] for n, m in adapted.named_modules() if type(m) is nn.Linear})
    dtype = str(next(m for m in adapted.modules() if is_nf4(m)).compute_dtype).removeprefix("torch.")
    nf4 = {"compute_dtype": dtype, "double_quant": True, "blocksize": blocksize, "skip_modules": skip}
    (tmp / "lotaqaf_nf4.json").write_text(json.dumps(nf4, indent=2) + "\n")
    lora = lora_pairs(adapted)
    report.update(nf4=nf4, offset_lora=save_offset_lora(tmp / "offset_lora", lora, str(final_dir)))
    return adapted, True


def write_lora(base: nn.Module, lora: dict, tmp: Path, tokenizer, info: dict, adapter_file: Path, final_dir: Path,
               report: dict) -> tuple[nn.Module, bool]:
    """Write a LoRA-type run unmerged (:func:`lora_branch_model`): its GPTQ base and ``lora`` as a PEFT LoRA
    (offset_lora/, what gptqmodel + PEFT load). Returns the model as the files hold it, and True (a branch)."""
    save_quantized(base, tokenizer, tmp, info["settings"], {**info["provenance"], "exported_from": info["content_hash"],
                                                            "adapter": str(adapter_file)})
    report["offset_lora"] = save_offset_lora(tmp / "offset_lora", lora, str(final_dir))
    return with_branches(base, lora), True


def with_branches(plain: nn.Module, branches: dict) -> nn.Module:
    """The GPTQ model plus its offset branches as one module: what a GPTQ engine with LoRA computes."""
    out = copy.deepcopy(plain)
    for name, pair in branches.items():
        replace_module(out, name, OffsetBranchLinear(out.get_submodule(name), *pair))
    return out


def compare(merged: nn.Module, held: nn.Module, windows: torch.Tensor | None = None) -> dict:
    """The export (``held``: the model as its files hold it) against the merged model: max |logit difference|
    on the merge certificate's probe batch and, given held-out windows, both perplexities."""
    return compare_models(merged, held, windows, names=("merged", "export"))


def exact_formats(model: nn.Module) -> list[str]:
    """The export formats that hold this merged model exactly (what a refusal may suggest): gguf for
    layers of 2-4 bits in contiguous groups of a multiple of 32 (Llama and Qwen2 layouts), torchao for
    contiguous groups, gptq always (with the offset branch when the zero points are fractional), hf16
    always."""
    qmods = quantized_modules(model).values()
    gguf_ok = model.config.model_type in ("llama", "qwen2") and all(q4_1_exact(q) for q in qmods)
    torchao_ok = all(contiguous_groups(q) for q in qmods)
    return ["gguf"] * gguf_ok + ["torchao"] * torchao_ok + ["gptq", "hf16"]


@torch.no_grad()
def convert(model: nn.Module, fmt: str, allow_lossy: bool = False, offset_branch: bool = True,
            exact: list[str] | None = None):
    """gptq: integer zero points plus, where they were fractional, the offset branch (or, with
    ``offset_branch=False``, rounded: refused unless allow_lossy; the refusal names the formats in
    ``exact``); hf16: dense. Returns (the model as the files hold it, the offset branches (gptq) or None,
    report); the model as the format computes it is :func:`with_branches` of the first two."""
    if fmt == "gptq":
        if offset_branch:
            return offset_branch_model(model)
        plain, n_frac = rounded_zero_model(model)
        if n_frac and not allow_lossy:
            others = [f for f in exact or exact_formats(model) if f != "gptq"]
            raise LotaqafError(f"{n_frac} zero points are fractional (offset factor); GPTQ without the offset branch "
                               f"cannot hold them. Exact instead: --format gptq (with its offset branch) or "
                               f"--format {' or '.join(others)} (or --allow-lossy to round them and measure the change)")
        return plain, {}, {"fractional_zero_points": n_frac}
    if fmt == "hf16":
        return dequantized_model(model), None, {}
    raise ValueError(fmt)


@torch.no_grad()
def write(model: nn.Module, fmt: str, tmp: Path, ex: DictConfig, tokenizer, info: dict, source: str,
          final_dir: Path, exact: list[str], report: dict) -> tuple[nn.Module, bool]:
    """Write the merged ``model`` in ``fmt`` under ``tmp`` (renamed to ``final_dir`` by the caller) and add
    what the writer measured to ``report``. Returns the model as the files hold it (what the comparison
    runs) and whether a GPTQ export has an offset branch. ``info``: the merged checkpoint's settings and
    provenance; ``source``: the run's model path (GGUF metadata); ``exact``: the other exact formats."""
    if fmt == "gguf":
        report.update(export_gguf(model, source, tmp / "model.gguf", tokenizer, exact, ex.gguf_type, ex.allow_lossy))
        return stored_model(model, ex.gguf_type), False  # the values the blocks hold, in float32
    if fmt == "torchao":
        report.update(export_torchao(model, tokenizer, tmp, exact=exact))
        return model, False  # every stored value is the merged model's own
    files, branches, extra = convert(model, fmt, ex.allow_lossy, ex.offset_branch, exact)
    report.update(extra)
    if fmt == "gptq":
        save_quantized(files, tokenizer, tmp, info["settings"],
                       {**info["provenance"], "exported_from": info["content_hash"]})
        if branches:
            report["offset_lora"] = save_offset_lora(tmp / "offset_lora", branches, str(final_dir))
        return with_branches(files, branches or {}), bool(branches)
    if hasattr(files.config, "quantization_config"):  # hf16: a plain transformers checkpoint
        del files.config.quantization_config
    files.save_pretrained(str(tmp), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    return files, False
