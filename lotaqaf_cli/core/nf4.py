"""QLoRA's base: NF4 with double quantization, held by bitsandbytes' Linear4bit (Dettmers et al. 2023).

NF4:         W[o, i] ~ code[q] * absmax[b]      q: 4-bit index into the 16 NF4 values (in [-1, 1]),
             b = block of 64 consecutive weights of the flattened row-major [out, in] weight,
             absmax[b] = max |W| over the block (fp32).
Double quant (compress_statistics): the absmax values are quantized once more,
             absmax[b] ~ code2[a[b]] * absmax2[b // 256] + offset
             a: uint8 codes (bitsandbytes' signed 8-bit dynamic map code2), absmax2 fp32 per 256 blocks,
             offset = mean of the fp32 absmax (one fp32 scalar per tensor).
QLoRA's defaults: blocksize 64, quant_type nf4, compress_statistics=True.

bitsandbytes is optional and imported on first use. The layers built here are quantized on CPU, frozen,
and keep bitsandbytes' standard layout on CPU (its eval-time AVX512-BF16 repacking is switched off per
layer), so dequantize_nf4 always reads the codes the forward uses. No I/O here.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys

import torch
from torch import nn

from .qlinear import replace_module

NF4_BLOCKSIZE = 64
MISSING = "quant=nf4 needs bitsandbytes (pip install bitsandbytes)"
# The nested (absmax) blocksize of double quant: bitsandbytes/functional.py quantize_4bit hard-codes
# quantize_blockwise(absmax - offset, blocksize=256), and matmul_4bit only runs state2.blocksize == 256.
NF4_NESTED_BLOCKSIZE = 256


def _bnb():
    """bitsandbytes, imported on first use (ImportError saying so when it is not installed; the config check
    refuses quant=nf4 before any work in that case)."""
    try:
        import bitsandbytes as bnb  # its import-time hub-kernel fetch message: ui.py filters it out
        import bitsandbytes.functional  # noqa: F401
    except ImportError as e:
        raise ImportError(MISSING) from e
    return bnb


def nf4_bits_per_weight(blocksize: int = NF4_BLOCKSIZE, double_quant: bool = True) -> float:
    """Storage per weight: 4 bits of code + the absmax statistics.

    Without double quant one fp32 absmax per block: 4 + 32 / blocksize (4.5 at 64). With it one uint8
    absmax per block plus one fp32 absmax2 per NF4_NESTED_BLOCKSIZE (256) blocks:
    4 + 8 / 64 + 32 / (64 * 256) = 4.127 at 64. Per-tensor constants (the fp32 offset, the 256-entry
    8-bit code map, the 16 NF4 values) are left out.
    """
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * NF4_NESTED_BLOCKSIZE)
    return 4 + 32 / blocksize


def requantize_nf4(weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype,
                   double_quant: bool = True, blocksize: int = NF4_BLOCKSIZE) -> nn.Module:
    """A frozen bnb Linear4bit (nf4) holding ``weight`` [out, in] quantized on CPU, ``bias`` kept.

    Also the lossy way a LoRA enters NF4: dequantize_nf4 + delta, quantized again.
    """
    bnb = _bnb()
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out_features, in_features], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=double_quant, quant_type="nf4", device="meta")
    w = weight.detach().to("cpu", torch.float32).contiguous()
    # Params4bit.to(device) on an unquantized parameter is where bitsandbytes quantizes (quantize_4bit).
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, blocksize=blocksize,
                                     compress_statistics=double_quant, quant_type="nf4",
                                     module=layer).to("cpu")
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to("cpu", torch.float32).clone(), requires_grad=False)
    # bitsandbytes repacks the weight in place (bf16 absmax, another nibble layout) on the first
    # eval-mode, no-grad CPU forward when the CPU has AVX512-BF16; keep the standard layout and the
    # compute dtype's arithmetic instead.
    layer.support_avx512bf16_for_cpu = False
    return layer


def quantize_linear_nf4(linear: nn.Linear, compute_dtype: torch.dtype, double_quant: bool = True,
                        blocksize: int = NF4_BLOCKSIZE) -> nn.Module:
    """``linear`` as a frozen NF4 Linear4bit (quantized on CPU, bias kept)."""
    return requantize_nf4(linear.weight, linear.bias, compute_dtype, double_quant, blocksize)


def is_nf4(module: nn.Module) -> bool:
    bnb = sys.modules.get("bitsandbytes")  # never imported: nothing can be a Linear4bit
    nn4 = getattr(bnb, "nn", None)
    return nn4 is not None and isinstance(module, nn4.Linear4bit) and module.weight.quant_type == "nf4"


def nf4_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every NF4 Linear4bit of ``model`` by its dotted name."""
    return {n: m for n, m in model.named_modules() if is_nf4(m)}


def quantize_model_nf4(model: nn.Module, target_modules: list[str], compute_dtype: torch.dtype,
                       double_quant: bool = True, blocksize: int = NF4_BLOCKSIZE) -> list[str]:
    """Replace, in place, every nn.Linear whose name's last component is in ``target_modules`` by its
    NF4 layer; returns the replaced names. bitsandbytes' own layers (nn.Linear subclasses) are skipped."""
    targets = set(target_modules)
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and not type(m).__module__.startswith("bitsandbytes")
             and n.rpartition(".")[2] in targets]
    for name in names:
        replace_module(model, name, quantize_linear_nf4(model.get_submodule(name), compute_dtype,
                                                        double_quant, blocksize))
    return names


def dequantize_nf4(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as bitsandbytes dequantizes it: float32 [out_features, in_features]."""
    bnb = _bnb()
    data, qs = layer.weight.data, layer.weight.quant_state
    if getattr(qs, "packing_format_for_cpu", False):  # a layer bitsandbytes repacked (not built here)
        data, qs = bnb.functional._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(qs))
    w = bnb.functional.dequantize_4bit(data, qs)
    return w.float().reshape(layer.out_features, layer.in_features)


def nf4_settings(group_size: int = NF4_BLOCKSIZE) -> dict:
    """What determines an NF4 base: QLoRA's NF4 with double quantization, blocks of ``group_size`` weights."""
    return {"method": "nf4", "bits": 4, "group_size": group_size, "double_quant": True}


def nf4_base_info(source_hash: str, group_size: int = NF4_BLOCKSIZE) -> dict:
    """The base info of an NF4 base (settings, content hash): a deterministic function of the source and the
    settings, so its hash is theirs; an adapter is bound to it as to a GPTQ base."""
    settings = nf4_settings(group_size)
    digest = hashlib.sha256(json.dumps({"source": source_hash, **settings}, sort_keys=True).encode()).hexdigest()
    return {"settings": settings, "content_hash": "sha256:" + digest, "provenance": {"source_hash": source_hash}}
