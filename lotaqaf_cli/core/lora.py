"""The baselines on the same QuantLinear base: 16-bit LoRA and QA-LoRA.

LoRA:    y = base(x) + (alpha / r) * x @ A @ B                       A [D_in, r], B [r, D_out]
QA-LoRA: y = base(x) + (alpha / r) * pool(x) @ A @ B                 A [G, r],    B [r, D_out]
         pool(x)[g] = mean of x over the input rows of quantization group g, so the adapter's
         contribution to row i of W is (alpha / r) * (A @ B)[g(i), :] / n_g: constant within a
         group, i.e. it folds exactly into a (fractional) zero point per (group, column).
B starts at zero (the adapter starts as a no-op), A Kaiming-uniform as PEFT does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .nf4 import is_nf4
from .qlinear import QuantLinear, replace_module


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, dtype=torch.float32):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base, self.rank, self.scaling = base, rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(self.in_dim, rank, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(rank, base.out_features, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A.T, a=math.sqrt(5))  # fan_in = in_dim, as nn.Linear(in_dim, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_dim(self) -> int:
        return self.base.in_features

    def adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) + scaling * x A B, the adapter's product in the activations' dtype (its float32 master
        weights cast on the way, as autocast does: bf16 at precision=bf16)."""
        y = self.base(x)
        h = self.adapter_input(self.dropout(x))
        return y + ((h @ self.lora_A.to(h.dtype)) @ self.lora_B.to(h.dtype) * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The adapter as an input-major weight delta [D_in, D_out] (for merging)."""
        return (self.lora_A @ self.lora_B) * self.scaling


class QALoRALinear(LoRALinear):
    def __init__(self, base: QuantLinear, rank: int, alpha: float, dropout: float = 0.0, dtype=torch.float32):
        self._groups = int(base.g_idx.max()) + 1
        super().__init__(base, rank, alpha, dropout, dtype)
        counts = torch.bincount(base.g_idx.long(), minlength=self._groups).clamp_min(1)
        self.register_buffer("group_counts", counts.float(), persistent=False)

    @property
    def in_dim(self) -> int:
        return self._groups

    def adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of x over the inputs of each quantization group: [..., D_in] -> [..., G]."""
        g = self.base.g_idx.long()
        pooled = x.new_zeros(*x.shape[:-1], self._groups).index_add_(-1, g, x)
        return pooled / self.group_counts.to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        per_group = (self.lora_A @ self.lora_B) * self.scaling / self.group_counts[:, None]  # [G, D_out]
        return per_group[self.base.g_idx.long()]

    def zero_point_shift(self) -> torch.Tensor:
        """z' = z - shift reproduces the adapter exactly: shift[g, j] = delta[g, j] / s[g, j]."""
        per_group = (self.lora_A @ self.lora_B) * self.scaling / self.group_counts[:, None]
        return per_group / self.base.scales


def attach_lora(model: nn.Module, kind: str, rank: int, alpha: float, dropout: float,
                target_modules: list[str], dtype=torch.float32) -> list[str]:
    """Wrap every QuantLinear (or NF4 layer: QLoRA) whose name ends with a target by a LoRA (kind="lora") or
    QA-LoRA layer."""
    cls = {"lora": LoRALinear, "qalora": QALoRALinear}[kind]
    names = [n for n, m in model.named_modules()
             if (isinstance(m, QuantLinear) or is_nf4(m)) and n.rsplit(".", 1)[-1] in target_modules]
    for n in names:
        replace_module(model, n, cls(model.get_submodule(n), rank, alpha, dropout, dtype))
    return names
