"""Training the quantization parameters themselves: scales (PEQA, EfficientQAT's E2E-QP) and zero points.

Notation as in quant.py (input-major): codes W_int [D_in, D_out] (frozen), scales s and zero points z
[G, D_out], group of input row i = g_idx[i]; W = s[g] * (W_int - z[g]).

- ``train=("scales",)``: s is trained (a float32 master). The forward uses s rounded to float16, the
  dtype every GPTQ checkpoint stores scales in, with a straight-through gradient to the master; the
  integer zero points stay, so the merge is a plain GPTQ checkpoint that every GPTQ engine serves.
- ``train=("zeros",)``: the zero points become fractional: z' = z - delta / s0, where ``delta`` [G, D_out]
  starts at 0 and is held in weight units (s0: the base's scales, fixed), so one learning rate suits
  scales and zero points alike. This is what LoTA-QAF's offset factor (z - mu) learns, trained directly;
  it deploys like LoTA-QAF's merge (fractional zero points).
- both: s and z' as above.

Gradients (dL/dW = x^T dL/dy): dL/ds[g, j] = sum_{i in g} dL/dW[i, j] * (W_int[i, j] - z'[g, j]);
dL/dz'[g, j] = -s[g, j] * sum_{i in g} dL/dW[i, j], so dL/d delta = s / s0 * sum_{i in g} dL/dW[i, j].

The forward multiplies through qlinear.quant_matmul with exactly the scales and zero points the merged
layer (:meth:`QuantParamLinear.merged`) holds, so the merge is bit-exact by construction.
Pure tensor math: no I/O, no printing.
"""

from __future__ import annotations

import torch
from torch import nn

from .qlinear import QuantLinear, quant_matmul, replace_module
from .quant import dequantize_packed

TRAINABLE = ("scales", "zeros")


def check_train(train) -> tuple[str, ...]:
    """The trained parameters in canonical order; ValueError unless a non-empty subset of TRAINABLE."""
    train = tuple(train)
    bad = [t for t in train if t not in TRAINABLE]
    if bad or not train or len(set(train)) != len(train):
        raise ValueError(f"adapter.train must list one or both of {', '.join(TRAINABLE)}, got {list(train)}")
    return tuple(t for t in TRAINABLE if t in train)


def fp16_round(s: torch.Tensor) -> torch.Tensor:
    """``s`` rounded to float16 (as a GPTQ checkpoint stores it), returned in float32, gradient straight through."""
    return s + (s.detach().half().float() - s.detach())


class _QuantParamFn(torch.autograd.Function):
    """y = x @ W + bias, W = s[g] * (W_int - z[g]) through quant_matmul; backward in float32."""

    @staticmethod
    def forward(ctx, x, scales, zeros, base):
        ctx.base = base
        ctx.save_for_backward(x, scales, zeros)
        return quant_matmul(x, base, zeros=zeros.detach(), scales=scales.detach())

    @staticmethod
    def backward(ctx, grad_y):
        x, scales, zeros = ctx.saved_tensors
        q: QuantLinear = ctx.base
        g = q.g_idx.long()
        grad_x = grad_s = grad_z = None
        if ctx.needs_input_grad[0]:
            w = dequantize_packed(q.qweight, q.bits, scales.detach(), zeros.detach(), q.g_idx).to(grad_y.dtype)
            grad_x = (grad_y.reshape(-1, grad_y.shape[-1]) @ w.t()).view(x.shape)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            x2 = x.reshape(-1, x.shape[-1]).float()
            gw = x2.t() @ grad_y.reshape(-1, grad_y.shape[-1]).float()            # dL/dW [D_in, D_out]
            if ctx.needs_input_grad[1]:
                centred = q.codes.float() - zeros.detach()[g]
                grad_s = torch.zeros_like(scales).index_add_(0, g, gw * centred)
            if ctx.needs_input_grad[2]:
                grad_z = -scales.detach() * torch.zeros_like(zeros).index_add_(0, g, gw)
        return grad_x, grad_s, grad_z, None


class QuantParamLinear(nn.Module):
    """A QuantLinear whose scales and/or zero points are trained (codes frozen). Parameters: ``scales``
    (float32 master, when trained) and ``zero_delta`` (the zero-point shift in weight units, when trained)."""

    def __init__(self, base: QuantLinear, train=("scales",)):
        super().__init__()
        self.base, self.train_params = base, check_train(train)
        self.in_features, self.out_features = base.in_features, base.out_features
        if "scales" in self.train_params:
            self.scales = nn.Parameter(base.scales.detach().float().clone())
        if "zeros" in self.train_params:
            self.zero_delta = nn.Parameter(torch.zeros_like(base.scales, dtype=torch.float32))

    def effective(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, z') as the forward and the merged layer use them (float32; differentiable)."""
        s = fp16_round(self.scales) if "scales" in self.train_params else self.base.scales.float()
        z = self.base.zeros.float()
        if "zeros" in self.train_params:
            z = z - self.zero_delta / self.base.scales.float()
        return s, z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, z = self.effective()
        return _QuantParamFn.apply(x, s, z, self.base)

    @torch.no_grad()
    def merged(self) -> QuantLinear:
        """The QuantLinear with the trained parameters in place: same codes, s (float16 values), z'."""
        s, z = self.effective()
        b = self.base
        return QuantLinear.from_packed(b.qweight, b.in_features, s, z, b.g_idx, b.bits, b.group_size, b.bias)


def attach_quant_params(model: nn.Module, train, target_modules) -> list[str]:
    """Wrap every QuantLinear whose name ends with a target in a QuantParamLinear, in place."""
    names = [n for n, m in model.named_modules()
             if isinstance(m, QuantLinear) and n.rsplit(".", 1)[-1] in target_modules]
    for n in names:
        replace_module(model, n, QuantParamLinear(model.get_submodule(n), train))
    return names
