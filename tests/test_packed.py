"""Quantized layers hold their codes packed: bits/8 bytes per weight plus scales and zero points."""

from __future__ import annotations

import pytest
import torch

from lotaqaf_cli.core.qlinear import QuantLinear
from lotaqaf_cli.core.quant import dequantize, rtn_quantize
from lotaqaf_cli.core.quantize_model import linear_layers


def resident_bytes(module: torch.nn.Module) -> int:
    """Bytes of every tensor storage the module holds (buffers, parameters, a kernel's cache)."""
    seen, total = set(), 0
    tensors = list(module.buffers()) + list(module.parameters())
    tensors += [t for v in getattr(module, "_cache", {}).values() for t in (v if isinstance(v, tuple) else [v])
                if isinstance(t, torch.Tensor)]
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_resident_bytes_of_quantized_smollm2(smollm2_loaded, bits):
    """Every linear layer of SmolLM2-135M quantized (RTN, g64): resident bytes within 10% of
    bits/8 bytes per weight plus the scales and zero points; the codes still dequantize to the
    round-to-nearest weight."""
    layers = linear_layers(smollm2_loaded.model)
    weights = held = scales_zeros = 0
    for lin in layers.values():
        codes, scales, zeros, g_idx = rtn_quantize(lin.weight.detach().t(), bits, 64)
        q = QuantLinear.from_quantized(codes, scales, zeros, g_idx, bits, 64)
        weights += codes.numel()
        held += resident_bytes(q)
        scales_zeros += q.scales.nbytes + q.zeros.nbytes
    assert len(layers) == 210
    expect = weights * bits / 8 + scales_zeros
    assert abs(held - expect) <= 0.10 * expect, (held, expect)
    # (uint8 codes, 1 byte per weight, would be 1.8x to 3.4x the expectation at these widths)
    # and what is held is the quantized weight: the last layer, against the unpacked reference
    torch.testing.assert_close(q.dequantize(), dequantize(codes, scales, zeros, g_idx), rtol=0, atol=0)
