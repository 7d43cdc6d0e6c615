"""The adapter layer types, named once: what training attaches, precision casting skips, the merge replaces
and adapter files hold (LoTA-QAF's ternary layer, LoRA and QA-LoRA, trained scales / zero points)."""

from __future__ import annotations

from .lora import LoRALinear
from .quant_params import QuantParamLinear
from .ternary import TernaryLinear

ADAPTER_LAYERS = (TernaryLinear, LoRALinear, QuantParamLinear)
