"""The offset branch of a GPTQ export as a standard PEFT LoRA adapter directory.

`offset_lora/adapter_config.json` is written by peft's own LoraConfig (r, lora_alpha equal to r so
that PEFT's scaling alpha / r is 1, rank_pattern / alpha_pattern for the layer kinds whose rank
G = D_in / group_size differs, dropout 0, no bias) and `offset_lora/adapter_model.safetensors` holds,
per layer NAME, `base_model.model.NAME.lora_A.weight` [G, D_in] (the 0/1 group indicator) and
`base_model.model.NAME.lora_B.weight` [D_out, G] (s * (z - z')), float32: PEFT's key names, which
PEFT (on a gptqmodel or dense base) and vLLM's LoRA loader read.
"""

from __future__ import annotations

from pathlib import Path

import torch


def kind_of(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def save_offset_lora(out_dir: Path, branches: dict[str, tuple[torch.Tensor, torch.Tensor]], base: str) -> dict:
    from peft import LoraConfig
    from safetensors.torch import save_file

    ranks: dict[str, int] = {}
    for name, (a, _b) in branches.items():
        r = ranks.setdefault(kind_of(name), a.shape[0])
        if r != a.shape[0]:
            raise ValueError(f"{name}: rank {a.shape[0]} differs from other {kind_of(name)} layers ({r})")
    r0 = max(ranks.values(), key=list(ranks.values()).count)  # the most common rank; the others by pattern
    pattern = {k: r for k, r in ranks.items() if r != r0}
    cfg = LoraConfig(r=r0, lora_alpha=r0, target_modules=sorted(ranks), rank_pattern=pattern, alpha_pattern=pattern,
                     lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base,
                     inference_mode=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(out_dir))
    tensors = {}
    for name, (a, b) in branches.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.float().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.float().contiguous()
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return {"ranks": ranks, "alpha_equals_rank": True}
