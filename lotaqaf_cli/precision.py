"""The precision lotaqaf computes in: the dtype of activations and of the non-quantized tensors
(embeddings, norms, lm_head) in train, ppl, merge and eval.

    PRECISIONS                      auto | bf16 | fp32 (the recipe key `precision`)
    resolve(name, device)           -> Precision(dtype, name, why): auto is bf16 on CUDA with bf16 and on CPUs
                                       with native bf16 instructions, float32 otherwise
    native_bf16_cpu()               the CPU flag that gives native bf16 (avx512_bf16, amx_bf16, arm's bf16) or None
    cast_(model, dtype)             in place: the model's floating parameters outside the adapters
    needs_cast(model, dtype)        whether cast_ would change anything
    cast_copy(model, dtype)         the model itself when it is already in dtype, else a cast copy
    dtype_name(model)               what a model computes in (its embeddings' dtype), e.g. "bfloat16"

What stays float32 whatever the precision (docs/decisions.md, 2026-12-05): the quantized layers' scales,
zero points and bias (buffers: each weight is dequantized in float32 and rounded to the activation dtype
once, identically in the adapter model and the merged model, so the merge stays bit-exact), the adapters'
parameters (master weights; ternary A_T, B_T hold integers), t-SignSGD's statistics and state, the GPTQ
solver and its calibration forwards (stages/quantize runs on the source as model.dtype says: the quantized
base is the same at either precision), and the loss and perplexity (logits upcast before the softmax).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .core.adapters import ADAPTER_LAYERS

PRECISIONS = ("auto", "bf16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 (AVX512-BF16, AMX), arm64 (FEAT_BF16)


@dataclass(frozen=True)
class Precision:
    name: str            # bf16 | fp32 (resolved)
    dtype: torch.dtype
    why: str             # how it was chosen, for run.log


def native_bf16_cpu(cpuinfo: str | None = None) -> str | None:
    """The first flag of CPU_BF16_FLAGS that /proc/cpuinfo lists (``cpuinfo``: its text), else None (also
    where /proc/cpuinfo cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return next((f for f in CPU_BF16_FLAGS if f in flags), None)


def resolve(name: str, device: torch.device) -> Precision:
    """The precision ``name`` (one of PRECISIONS) means on ``device``."""
    if name != "auto":
        return Precision(name, DTYPES[name], f"precision={name}")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", torch.bfloat16, "precision=auto: bf16 on CUDA")
        return Precision("fp32", torch.float32, "precision=auto: this CUDA device has no bf16, float32")
    flag = native_bf16_cpu() if device.type == "cpu" else None
    if flag is not None:
        return Precision("bf16", torch.bfloat16, f"precision=auto: bf16, the CPU has native bf16 ({flag})")
    return Precision("fp32", torch.float32, f"precision=auto: float32, no native bf16 on this {device.type}")


def _adapter_parameter_ids(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, ADAPTER_LAYERS)
            for p in m.parameters(recurse=False)}


def cast_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast, in place, the floating parameters of ``model`` that are not an adapter's (embeddings, norms,
    lm_head: tied ones stay tied) to ``dtype``. Buffers are left as they are: the quantized layers' codes,
    scales and zero points, and float32 tables such as rotary frequencies."""
    skip = _adapter_parameter_ids(model)
    for p in model.parameters():
        if id(p) not in skip and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model


def needs_cast(model: nn.Module, dtype: torch.dtype) -> bool:
    skip = _adapter_parameter_ids(model)
    return any(p.is_floating_point() and p.dtype != dtype for p in model.parameters() if id(p) not in skip)


def cast_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` itself when nothing needs casting, else a copy cast to ``dtype`` (the source stays as it
    is, e.g. a float32 source that quantization reads again). The parameters that :func:`cast_` would cast
    are copied straight into ``dtype`` (never a whole copy in the source's dtype first)."""
    if not needs_cast(model, dtype):
        return model
    skip = _adapter_parameter_ids(model)
    memo = {id(p): nn.Parameter(p.detach().to(dtype, copy=True), requires_grad=p.requires_grad)
            for p in model.parameters() if id(p) not in skip and p.is_floating_point() and p.dtype != dtype}
    return copy.deepcopy(model, memo)


def dtype_name(model: nn.Module) -> str:
    """The dtype ``model`` computes in (its input embeddings': what :func:`cast_` set), e.g. "bfloat16"."""
    return str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
