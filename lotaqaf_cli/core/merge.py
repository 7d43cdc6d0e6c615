"""Lossless merge of ternary adapters into their quantized base (method page, section 2).

    W_int' = W_int + W_hat      (never leaves [0, 2^N - 1]: the boundary check suppressed those markers)
    z'     = z - mu             (a fractional zero point per group x column)

The merged QuantLinear computes s * (W_int' - z') with the same operations as the adapter's
forward, so outputs are bit-identical. Unmerging subtracts the markers and restores z exactly.
Also the contrast case: a 16-bit LoRA can only enter the integer grid by dequantize + add + re-quantize.
No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .lora import LoRALinear, QALoRALinear
from .nf4 import dequantize_nf4, is_nf4, requantize_nf4
from .perplexity import perplexity
from .qlinear import QuantLinear, replace_module
from .quant import max_code, pack_ternary, rtn_quantize, unpack_ternary
from .ternary import TernaryLinear, merged_zeros

PROBE_SEED, PROBE_SHAPE = 0, (4, 64)  # the merge certificate's probe batch


def probe_batch(vocab: int) -> torch.Tensor:
    """Fixed random token ids [4, 64] (seed 0) on which the certificate compares logits."""
    g = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randint(3, vocab, PROBE_SHAPE, generator=g)


@torch.no_grad()
def probe_logits(model: nn.Module) -> torch.Tensor:
    """The model's float32 logits on the probe batch (moved to the model's device)."""
    return model(probe_batch(model.config.vocab_size).to(next(model.parameters()).device)).logits.float()


@torch.no_grad()
def compare_models(a: nn.Module, b: nn.Module, windows: torch.Tensor | None = None, names=("a", "b")) -> dict:
    """What the merge certificate and an export's check measure: the max |logit difference| of ``b`` from
    ``a`` on the probe batch and, given held-out windows, both perplexities (keyed by ``names``), the
    change and the number of tokens scored."""
    out = {"max_abs_logit_diff": (probe_logits(b) - probe_logits(a)).abs().max().item()}
    if windows is not None:
        pa, n = perplexity(a, windows)
        pb, _ = perplexity(b, windows)
        out["perplexity"] = {names[0]: pa, names[1]: pb, "change": pb - pa, "tokens": n}
    return out


@dataclass
class MergedLayer:
    layer: QuantLinear           # the merged layer (fractional zero points when mu is used)
    markers_packed: torch.Tensor  # W_hat [D_in, D_out] as 2-bit codes (pack_ternary, on the CPU): what
                                  # unmerge subtracts; packed so a whole model's markers cost 1/4 byte a weight
    int_zeros: torch.Tensor      # the base's integer zero points z: what unmerge restores
    stats: dict                  # counts of +1 / -1 / 0 markers and blocked codes

    @property
    def markers(self) -> torch.Tensor:
        """W_hat, int8 [D_in, D_out]."""
        return unpack_ternary(self.markers_packed, (self.layer.in_features, self.layer.out_features))


def merge_ternary(t: TernaryLinear) -> MergedLayer:
    base = t.base
    w_hat, mu = t.markers_and_offset()
    codes = base.codes.to(torch.int16) + w_hat.to(torch.int16)
    if int(codes.min()) < 0 or int(codes.max()) > max_code(base.bits):  # cannot happen: boundary check
        raise AssertionError("merged codes left the integer grid")
    merged = QuantLinear.from_quantized(codes.to(torch.uint8), base.scales, merged_zeros(base.zeros, mu),
                                        base.g_idx, base.bits, base.group_size, base.bias)
    st = t.marker_stats()
    return MergedLayer(merged, pack_ternary(w_hat), base.zeros.detach().clone(),
                       {"plus": st["plus"], "minus": st["minus"], "zero": st["zero"], "blocked": st["blocked"]})


def unmerge_layer(merged: QuantLinear, markers: torch.Tensor, int_zeros: torch.Tensor) -> QuantLinear:
    codes = merged.codes.to(torch.int16) - markers.to(torch.int16)
    return QuantLinear.from_quantized(codes.to(torch.uint8), merged.scales, int_zeros, merged.g_idx,
                                      merged.bits, merged.group_size, merged.bias)


@torch.no_grad()
def unmerge_model(model: nn.Module, merged: dict[str, dict]) -> None:
    """Undo a merge in place: ``merged`` maps layer names to their ``markers_packed`` (pack_ternary's
    words) and ``int_zeros``; one layer's markers are unpacked at a time."""
    for name, m in merged.items():
        layer = model.get_submodule(name)
        markers = unpack_ternary(m["markers_packed"], (layer.in_features, layer.out_features)).to(layer.qweight.device)
        replace_module(model, name, unmerge_layer(layer, markers, m["int_zeros"]))


@torch.no_grad()
def merge_model(model: nn.Module) -> dict[str, MergedLayer]:
    """Replace every TernaryLinear by its merged QuantLinear, in place."""
    out = {}
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, TernaryLinear)]:
        out[name] = merge_ternary(m)
        replace_module(model, name, out[name].layer)
    return out


@torch.no_grad()
def requantize_lora(layer: LoRALinear) -> nn.Module:
    """The only way a 16-bit LoRA enters a GPTQ grid: dequantize, add the LoRA delta, round again
    (min-max per group, the base's group size); on an NF4 base (QLoRA), NF4 again. QA-LoRA folds exactly
    into zero points instead."""
    base = layer.base
    if is_nf4(base):  # QLoRA: dequantize the NF4 base, add the delta, NF4 again
        w = dequantize_nf4(base) + layer.delta_weight().float().t()
        return requantize_nf4(w, base.bias, base.compute_dtype, blocksize=base.weight.blocksize)
    if isinstance(layer, QALoRALinear):
        return QuantLinear.from_packed(base.qweight, base.in_features, base.scales,
                                       base.zeros - layer.zero_point_shift(), base.g_idx, base.bits, base.group_size,
                                       base.bias)
    w = base.dequantize(torch.float32) + layer.delta_weight().float()
    codes, scales, zeros, g_idx = rtn_quantize(w, base.bits, base.group_size)
    return QuantLinear.from_quantized(codes, scales, zeros, g_idx, base.bits, base.group_size, base.bias)


@torch.no_grad()
def merge_lora_model(model: nn.Module) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for n in names:
        replace_module(model, n, requantize_lora(model.get_submodule(n)))
    return names
