"""QuantLinear: a linear layer held as integer codes, per-group scales and zero points.

In memory the codes are kept unpacked (uint8, input-major [D_in, D_out]); they are packed into
GPTQ int32 words only when a checkpoint is written (see io/checkpoint.py). Zero points are kept
as float so that a merged LoTA-QAF layer (fractional zero points) is the same module.
"""

from __future__ import annotations

import torch
from torch import nn

from .quant import dequantize, max_code, num_groups


def linear_in_major(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ w + bias for an input-major weight w [D_in, D_out].

    Every layer of lotaqaf (QuantLinear, the ternary adapter, the merged layer) multiplies through
    this one function, so a merged layer whose weight equals the adapter's W_eff bit for bit also
    produces bit-identical outputs (the merge certificate relies on it).
    """
    x2 = x.reshape(-1, x.shape[-1])
    y = x2 @ w if bias is None else torch.addmm(bias.to(x.dtype), x2, w)
    return y.view(*x.shape[:-1], w.shape[1])


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` inside ``root``."""
    owner, _, child = name.rpartition(".")
    setattr(root.get_submodule(owner) if owner else root, child, module)


def quantized_modules(model: nn.Module) -> dict[str, "QuantLinear"]:
    """Every QuantLinear of ``model`` by its dotted name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        g = num_groups(in_features, group_size)
        self.register_buffer("codes", torch.zeros(in_features, out_features, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(g, out_features))
        self.register_buffer("zeros", torch.zeros(g, out_features))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features))
        else:
            self.bias = None

    @classmethod
    def from_quantized(cls, codes, scales, zeros, g_idx, bits, group_size, bias=None) -> QuantLinear:
        d_in, d_out = codes.shape
        if int(codes.max()) > max_code(bits):
            raise ValueError(f"code {int(codes.max())} does not fit in {bits} bits")
        m = cls(d_in, d_out, bits, group_size, bias=bias is not None)
        m.codes.copy_(codes.to(torch.uint8))
        m.scales = scales.detach().float().clone()
        m.zeros = zeros.detach().float().clone()
        m.g_idx.copy_(g_idx.to(torch.int32))
        if bias is not None:
            m.bias = bias.detach().float().clone()
        return m

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Input-major dequantized weight [D_in, D_out]."""
        w = dequantize(self.codes, self.scales, self.zeros, self.g_idx)
        return w if dtype is None else w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_in_major(x, self.dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
