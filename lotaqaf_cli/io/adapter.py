"""Adapter files: the trained adapter alone, bound to the exact quantized base it was trained on.

`adapter.safetensors` holds, per adapted layer NAME:
- LoTA-QAF: `NAME.A_T` and `NAME.B_T` as 2-bit codes (value + 1 in {0, 1, 2}) packed 16 per
  int32 word in GPTQ's bit order, flattened row-major and zero-padded to a whole word;
- LoRA / QA-LoRA: `NAME.lora_A`, `NAME.lora_B` in their training dtype.
The safetensors metadata holds a JSON header: kind, rank, omega, offset factor, target modules,
shapes, and `base_hash` (content hash of the quantized base). Loading onto another base is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..core.lora import LoRALinear
from ..core.quant import pack_rows, unpack_rows
from ..core.ternary import TernaryLinear
from ..errors import LotaqafError

FORMAT = "lotaqaf-adapter-v1"


def pack_ternary(t: torch.Tensor) -> torch.Tensor:
    flat = (t.detach().round().to(torch.int64).flatten() + 1).cpu()
    pad = (-flat.numel()) % 16
    flat = torch.cat([flat, torch.ones(pad, dtype=torch.int64)])  # padding encodes 0
    return pack_rows(flat.view(-1, 1), 2)[:, 0].contiguous()


def unpack_ternary(words: torch.Tensor, shape) -> torch.Tensor:
    n = int(torch.tensor(shape).prod())
    flat = unpack_rows(words.view(-1, 1), 2)[:, 0].to(torch.int8) - 1
    return flat[:n].view(*shape)


def adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (TernaryLinear, LoRALinear))}


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
            tensors[f"{n}.lora_A"] = m.lora_A.detach().contiguous()
            tensors[f"{n}.lora_B"] = m.lora_B.detach().contiguous()
    meta = {"format": FORMAT, **header, "shapes": shapes, "layers": list(adapter_layers(model))}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"lotaqaf": json.dumps(meta)})
    os.replace(tmp, path)


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


def check_base(meta: dict, base_hash: str, path) -> None:
    if meta.get("base_hash") != base_hash:
        raise LotaqafError(f"adapter {path} was trained on another quantized base "
                           f"({meta.get('base_hash')}), not on this one ({base_hash})")
