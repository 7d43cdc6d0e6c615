"""The integer grid and GPTQ packing, against hand-built cases and float64 references."""

import math

import pytest
import torch

from lotaqaf_cli.core.quant import (
    dequantize,
    pack_cols,
    pack_rows,
    pack_zeros_v1,
    rtn_quantize,
    unpack_cols,
    unpack_rows,
    unpack_zeros_v1,
)


def reference_pack(codes: list[int], bits: int) -> list[int]:
    """Pure-Python GPTQ packing of one column: code k at stream bits [k*bits, (k+1)*bits)."""
    stream = 0
    for k, c in enumerate(codes):
        stream |= int(c) << (k * bits)
    n_words = len(codes) * bits // 32
    words = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(n_words)]
    return [w - 2**32 if w >= 2**31 else w for w in words]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n,m", [(32, 5), (96, 3), (160, 7), (256, 1)])
def test_pack_roundtrip_every_code(bits, n, m):
    if (n * bits) % 32:
        pytest.skip("not a whole number of words")
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (n, m), generator=g)
    codes[: 2**bits, 0] = torch.arange(min(n, 2**bits))  # every code value appears
    words = pack_rows(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (n * bits // 32, m)
    assert torch.equal(unpack_rows(words, bits).long(), codes)
    for j in range(m):  # independent pure-Python packer
        assert words[:, j].tolist() == reference_pack(codes[:, j].tolist(), bits)


def test_three_bit_dim_multiple_of_32_not_64():
    codes = torch.randint(0, 8, (96, 4), generator=torch.Generator().manual_seed(3))
    assert torch.equal(unpack_rows(pack_rows(codes, 3), 3).long(), codes)
    # code 10 straddles words 0 and 1: low 2 bits at bits 30-31 of word 0, high bit at bit 0 of word 1
    c = torch.zeros(32, 1, dtype=torch.long)
    c[10] = 0b101
    w = pack_rows(c, 3)[:, 0].tolist()
    assert (w[0] & 0xFFFFFFFF) == (0b01 << 30) and w[1] == 0b1 and w[2] == 0


def test_pack_hand_case_4bit():
    codes = torch.arange(8).view(8, 1)
    assert pack_rows(codes, 4)[0, 0].item() == 0x76543210


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_cols_and_v1_zeros(bits):
    g = torch.Generator().manual_seed(bits)
    z = torch.randint(1, 2**bits, (3, 64), generator=g)
    assert torch.equal(unpack_cols(pack_cols(z, bits), bits).long(), z)
    # v1 stores z - 1: for z >= 1 it is exactly the packing of z - 1
    assert torch.equal(pack_zeros_v1(z, bits), pack_cols(z - 1, bits))
    z[0, :5] = 0  # and the word-wise form stays invertible at z == 0
    assert torch.equal(unpack_zeros_v1(pack_zeros_v1(z, bits), bits, 64).long(), z)


def reference_minmax_dequant(w: torch.Tensor, bits: int, gs: int) -> torch.Tensor:
    """float64 re-implementation of the method page's grid with Python loops over groups."""
    w = w.double()
    d_in, d_out = w.shape
    maxq = 2**bits - 1
    out = torch.empty_like(w)
    for g0 in range(0, d_in, gs):
        for j in range(d_out):
            col = w[g0:g0 + gs, j]
            lo, hi = min(col.min().item(), 0.0), max(col.max().item(), 0.0)
            if lo == hi == 0:
                lo, hi = -1.0, 1.0
            s = float(torch.tensor((hi - lo) / maxq).half())  # scales are stored in fp16
            z = min(max(round(-lo / s), 0), maxq)
            for i in range(g0, g0 + gs):
                q = min(max(round(col[i - g0].item() / s) + z, 0), maxq)
                out[i, j] = s * (q - z)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequant_quant_matches_float64_reference(bits):
    g = torch.Generator().manual_seed(10 + bits)
    w = torch.randn(64, 6, generator=g)
    w[:32, 0] = w[:32, 0].abs()  # a group with no negative weights
    codes, scales, zeros, g_idx = rtn_quantize(w, bits, 32)
    got = dequantize(codes, scales, zeros, g_idx).double()
    ref = reference_minmax_dequant(w, bits, 32)
    # float32 vs float64 arithmetic of the same formula; a rounding tie may flip one code
    diff = (got - ref).abs()
    step = scales.max().item()
    assert (diff > 1e-5).float().mean() < 0.01 and diff.max() <= step + 1e-6
    assert math.isclose(got.sub(w.double()).abs().max().item(), ref.sub(w.double()).abs().max().item(),
                        rel_tol=1e-4)
    assert int(codes.max()) <= 2**bits - 1


def test_mse_params_pick_the_best_shrunk_grid_in_float64():
    """Against every candidate grid scored in float64: the chosen one has the smallest error, and is
    min-max (p = 1) when nothing beats it."""
    from lotaqaf_cli.core.quant import minmax_params, mse_params

    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 32, generator=g)
    w[:5, 0] *= 8  # outliers: clipping them pays
    bits, norm = 2, 2.4
    scale, zero = mse_params(w, bits, norm)

    def err64(s, z):
        s, z, w64 = s.double()[:, None], z.double()[:, None], w.double()
        q = torch.clamp(torch.round(w64 / s) + z, 0, 3)
        return ((s * (q - z) - w64).abs() ** norm).sum(1)

    lo, hi = w.amin(1).clamp(max=0).double(), w.amax(1).clamp(min=0).double()
    candidates = []
    for i in range(80):
        p = 1 - i / 100
        s = ((p * hi - p * lo) / 3).half().double()
        candidates.append(err64(s, torch.round(-p * lo / s).clamp(0, 3)))
    best = torch.stack(candidates).amin(0)
    assert torch.allclose(err64(scale, zero), best, rtol=1e-5)
    mm_scale, _ = minmax_params(w, bits)
    assert (scale[:5] < mm_scale[:5]).all()  # the outlier rows are clipped
    on_grid = torch.tensor([[-1.0, 0.0, 1.0, 2.0] * 8])  # exactly on the min-max grid (s 1, z 1): kept
    assert torch.equal(torch.stack(mse_params(on_grid, 2, norm)), torch.stack(minmax_params(on_grid, 2)))
