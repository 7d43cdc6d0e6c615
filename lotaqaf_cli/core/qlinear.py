"""QuantLinear: a linear layer held as packed integer codes, per-group scales and zero points.

In memory the codes stay packed as GPTQ int32 words (``qweight`` [W, D_out], packed along the input
dim, bits/8 bytes per weight; rows padded with zero codes to whole periods, see quant.packed_rows), so
a checkpoint's qweight is the layer's buffer as it is. Zero points are float so that a merged LoTA-QAF
layer (fractional zero points z - mu) is the same module.

Every layer of lotaqaf (QuantLinear, the ternary adapter, the merged layer) multiplies through
:func:`quant_matmul`, which picks a kernel (lotaqaf_kernels: Triton on CUDA, aten's int4 matmul for
few rows on CPU, else dequantize-then-matmul in torch). A merged layer and the adapter it came from
hand it the same codes (the adapter as codes + sparse markers, which add exactly), scales and zero
points, so both run the same arithmetic whichever kernel is picked: the merge is bit-exact by
construction.
"""

from __future__ import annotations

import copy

import lotaqaf_kernels as kernels
import torch
from torch import nn

from .quant import (
    _period,
    dequantize_packed,
    max_code,
    num_groups,
    pack_rows_padded,
    packed_rows,
    unpack_rows,
)


def linear_in_major(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ w + bias for an input-major weight w [D_in, D_out]."""
    x2 = x.reshape(-1, x.shape[-1])
    y = x2 @ w if bias is None else torch.addmm(bias.to(x.dtype), x2, w)
    return y.view(*x.shape[:-1], w.shape[1])


def quant_matmul(x: torch.Tensor, q: QuantLinear, zeros: torch.Tensor | None = None,
                 markers: tuple[torch.Tensor, torch.Tensor] | None = None, cache: dict | None = None,
                 weight_out: dict | None = None, scales: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W + bias with W = s[g] * ((W_int + W_hat) - z[g]) from ``q``'s packed codes.

    ``zeros`` replaces q.zeros (an adapter's z - mu), ``scales`` q.scales (trained scales); ``markers``
    are sparse W_hat (flat indices, +-1) added to the integer codes; ``cache`` (a dict the caller keeps,
    keyed by what the weight depends on) lets a kernel keep a prepared weight between calls; ``weight_out``: where the torch path leaves
    the dense W it formed (in x's dtype, under "w"), for a backward that would form it again.
    """
    zeros = q.zeros if zeros is None else zeros
    scales = q.scales if scales is None else scales
    x2 = x.reshape(-1, x.shape[-1])
    kernel = kernels.pick(x2, q.bits, q.contiguous_gs)
    if kernel == "triton":
        fired = markers is not None and markers[0].numel() > 0  # none fired: the kernel adds nothing (exact either way)
        words = kernels.marker_words(*markers, q.in_features, q.out_features) if fired else None
        y = kernels.qmm(x2, q.qweight, scales, zeros, q.g_idx, q.bits, q.bias, words)
    elif kernel == "cpu_int4":
        def prepare():
            codes = q.codes if markers is None else _with_markers(q.codes, markers)
            return kernels.int4_prepare(codes, scales, zeros, q.contiguous_gs)
        prepared = prepare() if cache is None else cache.get("int4") or cache.setdefault("int4", prepare())
        y = kernels.int4_mm(x2, prepared, q.bias)
    else:
        w = dequantize_packed(q.qweight, q.bits, scales, zeros, q.g_idx, markers).to(x.dtype)
        y = linear_in_major(x2, w, q.bias)
        if weight_out is not None:
            weight_out["w"] = w
    return y.view(*x.shape[:-1], q.out_features)


def _with_markers(codes: torch.Tensor, markers) -> torch.Tensor:
    codes = codes.clone()
    if markers[0].numel():
        flat = codes.view(-1)
        flat[markers[0]] = (flat[markers[0]].to(torch.int16) + markers[1]).to(torch.uint8)
    return codes


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` inside ``root``."""
    owner, _, child = name.rpartition(".")
    setattr(root.get_submodule(owner) if owner else root, child, module)


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    """Every QuantLinear of ``model`` by its dotted name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        g = num_groups(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(packed_rows(in_features, bits), out_features, dtype=torch.int32))
        self.register_buffer("scales", torch.ones(g, out_features))
        self.register_buffer("zeros", torch.zeros(g, out_features))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features))
        else:
            self.bias = None
        self._cache: dict = {}  # a kernel's prepared weight (not state: rebuilt when the buffers change)
        self.contiguous_gs: int | None = None  # gs when g_idx is arange(D_in) // gs (no act-order), else None
        self.register_load_state_dict_post_hook(lambda module, _keys: module._derive())

    def _derive(self) -> None:
        """What is derived from the buffers once instead of on every call."""
        self.contiguous_gs = kernels.contiguous_group_size(self.g_idx, self.scales.shape[0])

    @classmethod
    def from_quantized(cls, codes, scales, zeros, g_idx, bits, group_size, bias=None) -> QuantLinear:
        """From unpacked integer codes [D_in, D_out] (packed here)."""
        if int(codes.max()) > max_code(bits) or int(codes.min()) < 0:
            raise ValueError(f"codes must lie in [0, {max_code(bits)}] for {bits} bits")
        return cls.from_packed(pack_rows_padded(codes.cpu(), bits).to(codes.device), codes.shape[0], scales,
                               zeros, g_idx, bits, group_size, bias)

    @classmethod
    def from_packed(cls, qweight, in_features, scales, zeros, g_idx, bits, group_size, bias=None) -> QuantLinear:
        """From GPTQ words [in_features * bits / 32 (whole periods), D_out] as a checkpoint holds them."""
        if qweight.dtype != torch.int32 or qweight.shape[0] != packed_rows(in_features, bits):
            raise ValueError(f"qweight of shape {tuple(qweight.shape)} does not hold {in_features} rows of "
                             f"{bits}-bit codes")
        m = cls(in_features, qweight.shape[1], bits, group_size, bias=bias is not None)
        m.qweight = qweight.detach().clone()
        m.scales = scales.detach().float().clone()
        m.zeros = zeros.detach().float().clone()
        m.g_idx = g_idx.detach().to(torch.int32).clone()
        if bias is not None:
            m.bias = bias.detach().float().clone()
        m._derive()
        return m

    @property
    def codes(self) -> torch.Tensor:
        """The integer codes W_int, unpacked (uint8 [D_in, D_out]): a new tensor on each access."""
        return unpack_rows(self.qweight, self.bits, self.in_features)

    @property
    def gptq_packable(self) -> bool:
        """True when qweight is exactly GPTQ's qweight (D_in a whole number of packing periods)."""
        return self.in_features % _period(self.bits)[0] == 0

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Input-major dequantized weight [D_in, D_out]."""
        w = dequantize_packed(self.qweight, self.bits, self.scales, self.zeros, self.g_idx)
        return w if dtype is None else w.to(dtype)

    def _cache_for_call(self) -> dict:
        key = tuple((t.data_ptr(), t._version) for t in (self.qweight, self.scales, self.zeros))
        if self._cache.get("key") != key:
            self._cache = {"key": key}
        return self._cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_matmul(x, self, cache=self._cache_for_call())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


def dense_bytes(model: nn.Module) -> int:
    """Bytes of a float32 copy of the model's quantized layers (:func:`dequantized_model`)."""
    return 4 * sum(q.in_features * q.out_features for q in quantized_modules(model).values())


def dequantized_model(model: nn.Module, dtype=torch.float32) -> nn.Module:
    """A copy of ``model`` with every QuantLinear replaced by a plain nn.Linear holding its dequantized weight."""
    out = copy.deepcopy(model)
    for name, q in quantized_modules(out).items():
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(q.dequantize(torch.float32).t())
            if q.bias is not None:
                lin.bias.copy_(q.bias)
        replace_module(out, name, lin)
    return out
