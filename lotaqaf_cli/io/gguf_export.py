"""GGUF export (llama.cpp) of a merged lotaqaf model, with the `gguf` package.

A 4-bit layer whose groups are contiguous blocks of a multiple of 32 input rows maps onto Q4_1:
per block of 32 weights of one output row, w = d * q + m with d = s (already fp16-exact: lotaqaf
rounds scales to fp16 when quantizing) and m = -s * z' rounded to fp16, q = the 4-bit code. The
only error is that fp16 rounding of m. Other tensors keep the source file's type (Q8_0 is
re-quantized from the values lotaqaf holds, F32 otherwise).

Metadata (architecture keys, tokenizer, chat template) is copied from the source GGUF file, so this
export needs a GGUF source (the embedded model is one). llama.cpp stores q/k projections with rows
permuted for its rotary layout; the export applies that permutation (transformers' GGUF loader
reverses it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..core.qlinear import QuantLinear
from ..errors import LotaqafError
from .models import gguf_file

HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf_name: str) -> str | None:
    """model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight (None: not stored in GGUF)."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"] and parts[-1] == "weight":
        key = ".".join(parts[3:-1])
        if key in HF_TO_GGUF:
            return f"blk.{parts[2]}.{HF_TO_GGUF[key]}.weight"
    return None


def rotary_row_order(n_out: int, n_head: int) -> torch.Tensor:
    """Row order of llama.cpp's q/k permutation: new row r = old row order[r]."""
    return torch.arange(n_out).reshape(n_head, 2, n_out // n_head // 2).transpose(1, 2).reshape(-1)


def q4_1_blocks(q: QuantLinear, row_order: torch.Tensor | None) -> tuple[np.ndarray, float, float]:
    """Q4_1 bytes [D_out, D_in / 32 * 20] of a 4-bit layer, the largest |weight error| and the
    largest error in units of the block's integer step d (at most 15 * 2^-11: fp16 rounding of m)."""
    d_in, d_out = q.in_features, q.out_features
    gs = q.group_size if q.group_size > 0 else d_in
    if q.bits != 4 or gs % 32 or not torch.equal(q.g_idx.long(), torch.arange(d_in) // gs):
        raise ValueError("Q4_1 needs 4-bit codes in contiguous groups of a multiple of 32 rows")
    codes, scales, zeros = q.codes.t(), q.scales.t(), q.zeros.t()  # [D_out, ...]
    if row_order is not None:
        codes, scales, zeros = codes[row_order], scales[row_order], zeros[row_order]
    nb = d_in // 32
    block_group = torch.arange(nb) * 32 // gs
    d = scales[:, block_group].float()                       # [D_out, nb]
    m = -(scales * zeros)[:, block_group].float()
    d16, m16 = d.half(), m.half()
    qv = codes.reshape(d_out, nb, 32).to(torch.uint8)
    qs = qv[..., :16] | (qv[..., 16:] << 4)
    raw = torch.cat([d16.unsqueeze(-1).view(torch.uint8), m16.unsqueeze(-1).view(torch.uint8), qs], dim=-1)
    exact = d.unsqueeze(-1) * qv.float() + m.unsqueeze(-1)
    stored = d16.float().unsqueeze(-1) * qv.float() + m16.float().unsqueeze(-1)
    err = (exact - stored).abs()
    return raw.reshape(d_out, nb * 20).numpy(), float(err.max()), float((err / d.unsqueeze(-1)).max())


def source_gguf(source: str) -> Path:
    path = gguf_file(source)
    if path is None:
        raise LotaqafError(f"gguf export copies its metadata and tokenizer from a GGUF source model; this run's "
                           f"model ({source}) is not one")
    return path


def q4_1_exact(q: QuantLinear) -> bool:
    """Q4_1 holds the layer exactly (up to fp16 d and m): 4-bit codes in contiguous groups of a
    multiple of 32 input rows."""
    return q.bits == 4 and q.group_size > 0 and q.group_size % 32 == 0 and torch.equal(
        q.g_idx.long(), torch.arange(q.in_features, device=q.g_idx.device) // q.group_size)


def export_gguf(model, source: str, out_file: Path, allow_lossy: bool = False, exact: tuple = ("hf16",)) -> dict:
    """Write the merged ``model`` as a GGUF file; a model it cannot hold exactly is refused, naming
    the formats in ``exact`` that can."""
    import gguf

    try:
        src = gguf.GGUFReader(str(source_gguf(source)))
    except LotaqafError as e:
        raise LotaqafError(f"{e}; exact instead: --format {' or '.join(exact)}") from None
    arch = src.fields["general.architecture"].contents()
    if arch != "llama":
        raise LotaqafError(f"gguf export supports the llama architecture, not {arch}")
    cfg = model.config
    qmods = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    bad = [n for n, m in qmods.items() if not q4_1_exact(m)]
    if bad:
        raise LotaqafError(f"gguf export maps only 4-bit layers with contiguous groups of a multiple of 32 onto "
                           f"Q4_1 (exact); {bad[0]} is {qmods[bad[0]].bits}-bit g{qmods[bad[0]].group_size}. "
                           f"Exact instead: --format {' or '.join(exact)}")
    del allow_lossy  # no lossy GGUF path yet: everything exported here is exact up to fp16 rounding

    w = gguf.GGUFWriter(str(out_file), arch)
    for key, field in src.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), vtype, sub_type=sub)
    src_types = {t.name: t.tensor_type for t in src.tensors}
    state = model.state_dict()
    max_err, max_steps, n_q4 = 0.0, 0.0, 0
    for name, q in qmods.items():
        g = gguf_name(name + ".weight")
        order = None
        if g.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_attention_heads if "attn_q" in g else cfg.num_key_value_heads
            order = rotary_row_order(q.out_features, heads)
        raw, err, steps = q4_1_blocks(q, order)
        max_err, max_steps = max(max_err, err), max(max_steps, steps)
        n_q4 += 1
        w.add_tensor(g, raw, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    for name, t in state.items():
        g = gguf_name(name)
        if g is None or any(name.startswith(n + ".") for n in qmods):
            continue
        if name == "lm_head.weight" and getattr(cfg, "tie_word_embeddings", False):
            continue
        arr = t.detach().float().numpy()
        if src_types.get(g) == gguf.GGMLQuantizationType.Q8_0:
            w.add_tensor(g, gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(g, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"q4_1_layers": n_q4, "max_weight_error": max_err, "max_weight_error_in_steps": max_steps,
            "file": str(out_file)}
