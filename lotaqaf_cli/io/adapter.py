"""Adapter files: the trained adapter alone, bound to the exact quantized base it was trained on.

`adapter.safetensors` holds, per adapted layer NAME:
- LoTA-QAF: `NAME.A_T` and `NAME.B_T` as 2-bit codes (value + 1 in {0, 1, 2}) packed 16 per
  int32 word in GPTQ's bit order, flattened row-major and zero-padded to a whole word;
- LoRA / QA-LoRA: `NAME.lora_A`, `NAME.lora_B` in their training dtype;
- scales / zeros (core/quant_params.py): `NAME.scales` (the float32 master) and/or `NAME.zero_delta`.
The safetensors metadata holds a JSON header: the adapter's spec (kind, rank, omega,
offset_granularity or alpha, or train; target_modules), steps, seed, shapes, and `base_hash` (content hash of
the quantized base). Loading onto another base is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..core.adapters import ADAPTER_LAYERS
from ..core.lora import attach_lora
from ..core.qlinear import replace_module
from ..core.quant import pack_ternary, unpack_ternary
from ..core.quant_params import attach_quant_params
from ..core.ternary import TernaryLinear, attach_ternary_adapters
from ..errors import LotaqafError
from .files import atomic_file

FORMAT = "lotaqaf-adapter-v1"
KINDS = ("lota", "lora", "qalora", "scales", "zeros")
EXACT_KINDS = ("lota", "scales", "zeros")  # merged bit-exactly (the others re-quantize)
SPEC_KEYS = {"lota": ("kind", "rank", "omega", "offset_granularity", "markers", "target_modules"),
             "lora": ("kind", "rank", "alpha", "dropout", "target_modules"),
             "scales": ("kind", "train", "target_modules")}
SPEC_KEYS["qalora"] = SPEC_KEYS["lora"]
SPEC_KEYS["zeros"] = SPEC_KEYS["scales"]
SPEC_DEFAULTS = {"lota": {"markers": True}}   # also for files written before the key existed


def adapter_spec(kind: str, target_modules, **settings) -> dict:
    """What defines an adapter's layers (the header keys of its file): kind, target modules and rank +
    omega + offset_granularity + markers (lota), rank + alpha + dropout (lora, qalora) or the trained
    quantization parameters, train (scales, zeros)."""
    spec = {"kind": kind, "target_modules": list(target_modules), **SPEC_DEFAULTS.get(kind, {}), **settings}
    return {k: spec[k] for k in SPEC_KEYS[kind]}


def attach_adapter(model: nn.Module, spec: dict, seed: int | None = None) -> list[str]:
    """Attach the adapter layers ``spec`` describes to every targeted quantized layer, freshly
    initialised (from ``seed`` when given; loading passes none, as the tensors are overwritten).
    Returns the adapted layer names."""
    targets = list(spec["target_modules"])
    if spec["kind"] == "lota":
        g = None if seed is None else torch.Generator().manual_seed(seed)
        names = attach_ternary_adapters(model, spec["rank"], spec["omega"], spec["offset_granularity"], targets,
                                        generator=g, markers=spec.get("markers", True))
    elif spec["kind"] in ("scales", "zeros"):
        names = attach_quant_params(model, spec["train"], targets)
    else:
        if seed is not None:
            torch.manual_seed(seed)
        names = attach_lora(model, spec["kind"], spec["rank"], spec["alpha"], spec.get("dropout", 0.0), targets)
    if not names:
        raise LotaqafError(f"no quantized layer matches model.target_modules={targets}")
    return names


def adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ADAPTER_LAYERS)}


@contextlib.contextmanager
def without_adapters(model: nn.Module):
    """``model`` with every adapter layer swapped for the quantized layer it wraps (the base, scored
    without a copy: the adapters hold their base layers by reference), put back on exit."""
    layers = adapter_layers(model)
    for name, m in layers.items():
        replace_module(model, name, m.base)
    try:
        yield model
    finally:
        for name, m in layers.items():
            replace_module(model, name, m)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable adapter tensors, exactly as they are (for training checkpoints)."""
    out = {}
    for n, m in adapter_layers(model).items():
        for p_name, p in m.named_parameters(recurse=False):
            out[f"{n}.{p_name}"] = p.detach().clone().contiguous()
    return out


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for n, m in adapter_layers(model).items():
        for p_name, p in m.named_parameters(recurse=False):
            p.data.copy_(state[f"{n}.{p_name}"])


def save_adapter(model: nn.Module, path: str | os.PathLike, header: dict) -> None:
    from safetensors.torch import save_file

    tensors, shapes = {}, {}
    for n, m in adapter_layers(model).items():
        if isinstance(m, TernaryLinear):
            for p_name in ("A_T", "B_T"):
                p = getattr(m, p_name)
                tensors[f"{n}.{p_name}"] = pack_ternary(p)
                shapes[f"{n}.{p_name}"] = list(p.shape)
        else:
            tensors.update({f"{n}.{p_name}": p.detach().contiguous() for p_name, p in m.named_parameters(recurse=False)})
    meta = {"format": FORMAT, **header, "shapes": shapes, "layers": list(adapter_layers(model))}
    path = Path(path)
    with atomic_file(path) as tmp:  # a reader sees the old file or the whole new one
        save_file(tensors, str(tmp), metadata={"lotaqaf": json.dumps(meta)})


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header, tensors) with ternary tensors unpacked to int8 of their shapes."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("lotaqaf", "{}"))
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise LotaqafError(f"cannot read adapter {path}: corrupted or not an adapter file ({str(e)[:100]})") from None
    if meta.get("format") != FORMAT:
        raise LotaqafError(f"{path} is not a lotaqaf adapter file")
    shapes = meta.get("shapes", {})
    tensors = {k: (unpack_ternary(v, shapes[k]) if k in shapes else v) for k, v in raw.items()}
    return meta, tensors


def load_adapter(model: nn.Module, path: str | os.PathLike, base_hash: str) -> dict:
    """Attach the adapter of file ``path`` to ``model`` (its quantized base, content hash ``base_hash``)
    and load its tensors, in place. Returns the file's header."""
    meta, tensors = read_adapter(path)
    check_base(meta, base_hash, path)
    if "offset_factor" in meta and "offset_granularity" not in meta:  # files written before the rename
        meta["offset_granularity"] = meta.pop("offset_factor")
    for k, v in SPEC_DEFAULTS.get(meta["kind"], {}).items():
        meta.setdefault(k, v)
    attach_adapter(model, adapter_spec(meta["kind"], meta["target_modules"],
                                       **{k: meta.get(k, 0.0) for k in SPEC_KEYS[meta["kind"]][1:-1]}))
    layers = adapter_layers(model)
    if sorted(layers) != sorted(meta["layers"]):
        raise LotaqafError(f"adapter {path} does not match the layers of its base")
    with torch.no_grad():
        for name, m in layers.items():
            for p_name, p in m.named_parameters(recurse=False):
                key = f"{name}.{p_name}"
                if key not in tensors or tuple(tensors[key].shape) != tuple(p.shape):
                    raise LotaqafError(f"adapter {path} is corrupted: {key} is missing or misshapen")
                p.copy_(tensors[key].to(p.dtype))
    return meta


def check_base(meta: dict, base_hash: str, path) -> None:
    if meta.get("base_hash") != base_hash:
        raise LotaqafError(f"adapter {path} was trained on another quantized base "
                           f"({meta.get('base_hash')}), not on this one ({base_hash})")
