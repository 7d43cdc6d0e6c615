"""GGUF export (llama.cpp) of a merged lotaqaf model, with the `gguf` package.

Q4_1 stores, per block of 32 weights of one output row, w = d * q + m with a 4-bit code q (0..15)
and fp16 d and m. A merged layer of 2, 3 or 4 bits whose groups are contiguous blocks of a multiple
of 32 input rows maps onto it exactly: d = s (already fp16-exact: lotaqaf rounds scales to fp16 when
quantizing), m = -s * z' rounded to fp16 (z' the fractional zero point), q = the code (2- and 3-bit
codes are 4-bit codes that never use the top values). The only error is that fp16 rounding of m.

Smaller and not exact, on request only (``gguf_type``, with allow_lossy): llama.cpp's K-quants hold,
per super-block of 256 weights of a row, one fp16 pair (d, dmin) and per sub-block an integer scale
and minimum, w = d * sc * q - dmin * mn. Q4_K: 8 sub-blocks of 32, 6-bit sc and mn, 4-bit codes
(4.5 bits a weight); Q2_K: 16 sub-blocks of 16, 4-bit sc and mn, 2-bit codes (2.625 bits a weight).
The codes are kept; each sub-block's s and s * z' are rounded onto that grid. A layer whose D_in is
not a multiple of 256, or whose groups straddle super-blocks, stays Q4_1 (llama.cpp's own quantize
falls back the same way).
Tensors outside the decoder's linears: from a GGUF source, the source file's type (Q8_0 is
re-quantized from the values lotaqaf holds, F32 otherwise); from a Hugging Face source, F16 where
every value is fp16-exact, else F32.

Metadata: copied from a GGUF source; for a Hugging Face source built from the model's config, and
the tokenizer from its tokenizer.json through the gguf package's own vocabulary helpers (BpeVocab,
SpecialVocab). llama.cpp stores llama q/k projections with rows permuted for its rotary layout; the
export applies that permutation (transformers' GGUF loader reverses it). Llama and Qwen2 layouts.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.qlinear import QuantLinear, quantized_modules
from ..errors import LotaqafError
from .models import gguf_file

GGUF_TYPES = ("q4_1", "q4_k", "q2_k")   # export.gguf_type: Q4_1 exact up to fp16 minimums; the K-quants lossy
GGUF_TYPE_CHANGE = {"q4_k": "6-bit scales and minimums per 32 weights under one fp16 pair per 256",
                    "q2_k": "4-bit scales and minimums per 16 weights under one fp16 pair per 256"}


def lossy_gguf_refusal(gguf_type: str) -> str:
    """Why a GGUF K-quant export needs --allow-lossy (config validation, before any model loads, and export_gguf)."""
    return (f"export.gguf_type={gguf_type} changes the model ({GGUF_TYPE_CHANGE[gguf_type]}); "
            f"add --allow-lossy, or keep gguf_type=q4_1 (exact up to fp16 minimums)")


ARCHS = ("llama", "qwen2")
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
    if parts[:2] == ["model", "layers"] and parts[-1] in ("weight", "bias"):
        key = ".".join(parts[3:-1])
        if key in HF_TO_GGUF:
            return f"blk.{parts[2]}.{HF_TO_GGUF[key]}.{parts[-1]}"
    return None


def rotary_row_order(n_out: int, n_head: int) -> torch.Tensor:
    """Row order of llama.cpp's q/k permutation: new row r = old row order[r]."""
    return torch.arange(n_out).reshape(n_head, 2, n_out // n_head // 2).transpose(1, 2).reshape(-1)


def q4_1_exact(q: QuantLinear) -> bool:
    """Q4_1 holds the layer exactly (up to fp16 m): codes of at most 4 bits in contiguous groups of a
    multiple of 32 input rows (no act-order)."""
    return q.bits <= 4 and q.group_size > 0 and q.group_size % 32 == 0 and torch.equal(
        q.g_idx.long(), torch.arange(q.in_features, device=q.g_idx.device) // q.group_size)


def block_params(q: QuantLinear, row_order: torch.Tensor | None, block: int):
    """Per block of ``block`` input rows of each output row: codes [D_out, nb, block], the step
    d = s and the minimum m = -s * z' (float64, [D_out, nb])."""
    codes, scales, zeros = q.codes.t(), q.scales.t().double(), q.zeros.t().double()  # [D_out, ...]
    if row_order is not None:
        codes, scales, zeros = codes[row_order], scales[row_order], zeros[row_order]
    nb = q.in_features // block
    group = torch.arange(nb) * block // q.group_size
    return codes.reshape(q.out_features, nb, block), scales[:, group], -(scales * zeros)[:, group]


QK_K = 256
K_QUANTS = {"q4_k": (8, 63), "q2_k": (16, 15)}  # sub-blocks per super-block, largest sc / mn


def layer_type(q: QuantLinear, gguf_type: str) -> str:
    """The GGUF type a Q4_1-exact layer is stored in: the K-quant asked for where it fits (D_in a
    multiple of 256, groups within one super-block or made of whole ones), else q4_1."""
    fits = q.in_features % QK_K == 0 and (QK_K % q.group_size == 0 or q.group_size % QK_K == 0)
    return gguf_type if gguf_type in K_QUANTS and fits else "q4_1"


def k_quant_params(q: QuantLinear, kind: str):
    """A layer on a K-quant grid: codes [D_out, D_in], per super-block d and dmin (fp16, [D_out, nsb]),
    per sub-block sc and mn (integers, [D_out, nsb, nsub]), and the step and minimum each sub-block
    then holds (float64, [D_out, nb]: d * sc, dmin * mn; the weight is step * code - minimum).
    d = max(s) / levels and dmin = max(s * z') / levels over the super-block (the larger-magnitude
    sign when the minimums have both signs; the others go to 0); sc >= 1 keeps every step nonzero."""
    nsub, levels = K_QUANTS[kind]
    codes, steps, m = block_params(q, None, QK_K // nsub)          # steps = s, m = -s z' per sub-block
    n_out, nb = steps.shape
    t, u = steps.reshape(n_out, -1, nsub), (-m).reshape(n_out, -1, nsub)
    d16 = (t.amax(-1) / levels).half()
    sc = (t / d16.double().unsqueeze(-1)).round().clamp(1, levels)
    umax, umin = u.amax(-1), u.amin(-1)
    dmin16 = (torch.where(umax >= -umin, umax, umin) / levels).half()
    dm = dmin16.double().unsqueeze(-1)
    mn = torch.where(dm != 0, u / torch.where(dm != 0, dm, 1), 0).round().clamp(0, levels)
    held_step = (d16.double().unsqueeze(-1) * sc).reshape(n_out, nb)
    held_min = (dm * mn).reshape(n_out, nb)
    return codes.reshape(n_out, -1).to(torch.uint8), d16, dmin16, sc.to(torch.uint8), mn.to(torch.uint8), held_step, held_min


def k_quant_bytes(codes, d16, dmin16, sc, mn, kind: str) -> np.ndarray:
    """The K-quant blocks [D_out, D_in / 256 * bytes] in llama.cpp's layout (block_q4_K: d, dmin,
    12 bytes of packed 6-bit sc/mn, 128 bytes of nibbles, each 64 weights as 32 low + 32 high
    nibbles; block_q2_K: 16 bytes sc | mn << 4, 64 bytes of 2-bit codes, each 128 weights as 4
    planes of 32, then d, dmin)."""
    n_out, nsb = d16.shape
    c = codes.reshape(n_out, nsb, QK_K)
    half = lambda x: x.unsqueeze(-1).view(torch.uint8)  # noqa: E731  fp16 -> its 2 bytes
    if kind == "q4_k":
        lo_s, hi_s, lo_m, hi_m = sc[..., :4], sc[..., 4:], mn[..., :4], mn[..., 4:]
        scales = torch.cat([lo_s | ((hi_s >> 4) << 6), lo_m | ((hi_m >> 4) << 6), (hi_s & 15) | ((hi_m & 15) << 4)], -1)
        c = c.reshape(n_out, nsb, 4, 2, 32)
        qs = (c[..., 0, :] | (c[..., 1, :] << 4)).reshape(n_out, nsb, 128)
        raw = torch.cat([half(d16), half(dmin16), scales, qs], -1)
    else:
        scales = sc | (mn << 4)
        c = c.reshape(n_out, nsb, 2, 4, 32)
        qs = (c[..., 0, :] | (c[..., 1, :] << 2) | (c[..., 2, :] << 4) | (c[..., 3, :] << 6)).reshape(n_out, nsb, 64)
        raw = torch.cat([scales, qs, half(d16), half(dmin16)], -1)
    return raw.reshape(n_out, -1).numpy()


def stored_values(q: QuantLinear, gguf_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, zero points) [G, D_out], float32, that give the values the GGUF file holds for the
    layer: Q4_1's fp16 minimum, or the K-quant grid's step and minimum (group-uniform by the fit
    rule of :func:`layer_type`)."""
    kind = layer_type(q, gguf_type)
    if kind == "q4_1":  # m = -s z' in fp16; fp16 rounding is sign-symmetric, so z = fp16(s z') / s
        s = q.scales.double()
        return q.scales.float(), ((s * q.zeros.double()).half().double() / s).float()
    *_, step, minimum = k_quant_params(q, kind)
    sub = QK_K // K_QUANTS[kind][0]
    first = torch.arange(q.scales.shape[0]) * q.group_size // sub  # the first sub-block of each group
    step, minimum = step[:, first].t(), minimum[:, first].t()
    return step.float(), (minimum / step).float()


def stored_model(model: nn.Module, gguf_type: str = "q4_1") -> nn.Module:
    """The merged model as the GGUF file holds it (evaluated in float32: what storage alone changes)."""
    out = copy.deepcopy(model)
    for q in quantized_modules(out).values():
        q.scales, q.zeros = stored_values(q, gguf_type)
    return out


def q4_1_blocks(q: QuantLinear, row_order: torch.Tensor | None) -> tuple[np.ndarray, float, float]:
    """Q4_1 bytes [D_out, D_in / 32 * 20] of a layer of at most 4 bits, the largest |weight error|
    and the largest error in units of the block's step d (at most 15 * 2^-11: fp16 rounding of m)."""
    if not q4_1_exact(q):
        raise ValueError("Q4_1 needs codes of at most 4 bits in contiguous groups of a multiple of 32 rows")
    codes, d, m = block_params(q, row_order, 32)
    d16, m16 = d.half(), m.half()
    qv = codes.to(torch.uint8)
    qs = qv[..., :16] | (qv[..., 16:] << 4)
    raw = torch.cat([d16.unsqueeze(-1).view(torch.uint8), m16.unsqueeze(-1).view(torch.uint8), qs], dim=-1)
    exact = d.unsqueeze(-1) * qv.double() + m.unsqueeze(-1)
    stored = d16.double().unsqueeze(-1) * qv.double() + m16.double().unsqueeze(-1)
    err = (exact - stored).abs()
    return (raw.reshape(q.out_features, -1).numpy(), float(err.max()),
            float((err / d.unsqueeze(-1)).max()))


def k_quant_blocks(q: QuantLinear, row_order: torch.Tensor | None, kind: str) -> tuple[np.ndarray, float, float]:
    """K-quant bytes of a layer (rows in ``row_order``), the largest |weight error| and the largest
    error in units of the group's step s."""
    codes, d16, dmin16, sc, mn, step, minimum = k_quant_params(q, kind)
    raw = k_quant_bytes(codes, d16, dmin16, sc, mn, kind)
    if row_order is not None:
        raw = raw[row_order.numpy()]
    sub_codes, s, m = block_params(q, None, QK_K // K_QUANTS[kind][0])
    err = ((s.unsqueeze(-1) * sub_codes + m.unsqueeze(-1)) - (step.unsqueeze(-1) * sub_codes - minimum.unsqueeze(-1))).abs()
    return raw, float(err.max()), float((err / s.unsqueeze(-1)).max())


# ----------------------------------------------------------------------------------------------------
# metadata for a Hugging Face source
# ----------------------------------------------------------------------------------------------------
def _strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's pre-tokenizer type for a GPT-2-style BPE tokenizer.json: `llama-bpe` (Llama 3's
    split regex, digits in runs of 1-3), `qwen2` (the same regex with single digits), `smollm`
    (single digits, then byte-level), `gpt-2` (byte-level alone, which splits with GPT-2's regex),
    else `default`. llama.cpp's `default` is not GPT-2's split: it cuts punctuation from the space
    before it (" +" becomes " ", "+"; measured with llama-cpp-python 0.3.36)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    text = " ".join(_strings(pre))
    if "\\p{N}{1,3}" in text:
        return "llama-bpe"
    if "\\p{L}+|\\p{N}|" in text:
        return "qwen2"
    if "Digits" in text and '"individual_digits": true' in json.dumps(pre):
        return "smollm"
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    return "default"


def add_tokenizer(w, tokenizer, vocab_size: int) -> dict:
    """Tokenizer metadata from the Hugging Face tokenizer (GPT-2-style byte-level BPE), through the
    gguf package's BpeVocab and SpecialVocab. Tokens the tokenizer marks special become CONTROL.
    Returns what was chosen (for the export record)."""
    import gguf

    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        try:
            vocab = gguf.vocab.BpeVocab(Path(d))
        except (FileNotFoundError, ValueError) as e:
            raise LotaqafError(f"gguf export from a Hugging Face source needs a byte-level BPE tokenizer.json "
                               f"(GPT-2 style, as Llama 3, Qwen2 and SmolLM2 have): {e}") from None
        tj = json.loads((Path(d) / "tokenizer.json").read_text(encoding="utf-8"))
        special = gguf.vocab.SpecialVocab(Path(d), load_merges=True, n_vocab=vocab_size)
    tokens, types = [], []
    for text, _score, ttype in vocab.all_tokens():
        tokens.append(text if isinstance(text, str) else text.decode("utf-8"))
        types.append(ttype)
    special_ids = {t.content: i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    for text, i in special_ids.items():
        if i < len(types) and tokens[i] == text:
            types[i] = gguf.TokenType.CONTROL
    for i in range(len(tokens), vocab_size):  # embedding rows past the tokenizer's vocabulary
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    pre = pre_tokenizer_name(tj)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special.add_to_gguf(w, quiet=True)
    return {"tokenizer": "gpt2", "pre_tokenizer": pre, "tokens": len(tokens), "merges": len(special.merges)}


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's rope scaling (what llama.cpp reads as rope_freqs.weight):
    1 for short wavelengths, `factor` for long ones, a smooth blend between."""
    base, factor = rope["rope_theta"], rope["factor"]
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope["original_max_position_embeddings"]
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def add_hf_metadata(w, cfg, tokenizer, file_type) -> dict:
    """Architecture keys from the transformers config (and rope_freqs for Llama 3.1 scaling)."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    rope.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    w.add_name(getattr(cfg, "_name_or_path", "") or "lotaqaf-merged")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(file_type)
    rope_type = rope.get("rope_type", "default")
    if rope_type == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(rope, head_dim))
    elif rope_type not in ("default", None):
        raise LotaqafError(f"gguf export: rope_type {rope_type!r} is not supported (default and llama3 are)")
    if tokenizer is None:  # a model without a tokenizer (the smoke model): llama.cpp's "no vocabulary"
        w.add_tokenizer_model("none")
        return {"tokenizer": None}
    return add_tokenizer(w, tokenizer, cfg.vocab_size)


def copy_gguf_metadata(w, src) -> None:
    """Every key of the source file but its architecture and file type (the writer sets both)."""
    import gguf

    for key, field in src.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), vtype, sub_type=sub)


def dense_tensor(arr: np.ndarray, src_type):
    """(data, raw_dtype) of a tensor outside the quantized linears."""
    import gguf

    if src_type == gguf.GGMLQuantizationType.Q8_0:
        return gguf.quants.quantize(arr, src_type), src_type
    if src_type is None and arr.ndim == 2 and np.array_equal(arr.astype(np.float16).astype(np.float32), arr):
        return arr.astype(np.float16), None  # fp16-exact (a bf16 or fp16 source): half the bytes, same values
    return arr, None


def export_gguf(model, source: str, out_file: Path, tokenizer=None, exact: tuple = ("hf16",),
                gguf_type: str = "q4_1", allow_lossy: bool = False) -> dict:
    """Write the merged ``model`` as a GGUF file (metadata from a GGUF ``source``, else from the config
    and ``tokenizer``), its layers as Q4_1 or, where they fit, the K-quant ``gguf_type`` (which changes
    the model: refused unless ``allow_lossy``). A model it cannot hold is refused, naming the formats in
    ``exact`` that can."""
    import gguf

    cfg = model.config
    arch = cfg.model_type
    alternatives = f"exact instead: --format {' or '.join(exact)}"
    if arch not in ARCHS:
        raise LotaqafError(f"gguf export supports the {' and '.join(ARCHS)} architectures, not {arch}; {alternatives}")
    qmods = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    bad = [n for n, m in qmods.items() if not q4_1_exact(m)]
    if bad:
        q = qmods[bad[0]]
        why = "act-order groups" if q.group_size % 32 == 0 and q.bits <= 4 else f"{q.bits}-bit g{q.group_size}"
        raise LotaqafError(f"gguf export maps layers of 2-4 bits in contiguous groups of a multiple of 32 onto Q4_1; "
                           f"{bad[0]} has {why}; {alternatives}")
    if gguf_type not in GGUF_TYPES:
        raise LotaqafError(f"export.gguf_type={gguf_type}: one of {', '.join(GGUF_TYPES)}")
    kinds = {n: layer_type(m, gguf_type) for n, m in qmods.items()}
    if gguf_type != "q4_1" and not allow_lossy:
        raise LotaqafError(lossy_gguf_refusal(gguf_type))
    wide = [n for n, m in qmods.items() if kinds[n] == "q2_k" and m.bits > 2]
    if wide:
        raise LotaqafError(f"export.gguf_type=q2_k holds 2-bit codes; {wide[0]} is {qmods[wide[0]].bits}-bit: "
                           f"use gguf_type=q4_k or q4_1")
    file_type = {"q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_S,
                 "q2_k": gguf.LlamaFileType.MOSTLY_Q2_K}[gguf_type]

    src_path = gguf_file(source)
    src = gguf.GGUFReader(str(src_path)) if src_path is not None else None
    if src is not None and src.fields["general.architecture"].contents() != arch:
        raise LotaqafError(f"the source GGUF's architecture differs from the model's ({arch})")
    w = gguf.GGUFWriter(str(out_file), arch)
    if src is not None:
        copy_gguf_metadata(w, src)
        w.add_file_type(file_type)
        meta = {"metadata": f"copied from {src_path.name}"}
        src_types = {t.name: t.tensor_type for t in src.tensors}
    else:
        meta = {"metadata": "built from the config and the Hugging Face tokenizer", **add_hf_metadata(w, cfg, tokenizer, file_type)}
        src_types = {}
    state = model.state_dict()
    max_err, max_steps, counts = 0.0, 0.0, {}
    for name, q in qmods.items():
        g = gguf_name(name + ".weight")
        order = None
        if arch == "llama" and g.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_attention_heads if "attn_q" in g else cfg.num_key_value_heads
            order = rotary_row_order(q.out_features, heads)
        if kinds[name] == "q4_1":
            raw, err, steps = q4_1_blocks(q, order)
        else:
            raw, err, steps = k_quant_blocks(q, order, kinds[name])
        max_err, max_steps = max(max_err, err), max(max_steps, steps)
        counts[kinds[name]] = counts.get(kinds[name], 0) + 1
        w.add_tensor(g, raw, raw_dtype=getattr(gguf.GGMLQuantizationType, kinds[name].upper()))
        if q.bias is not None:
            bias = q.bias.detach().float().numpy()
            if order is not None:
                bias = bias[order.numpy()]
            w.add_tensor(gguf_name(name + ".bias"), bias)
    for name, t in state.items():
        g = gguf_name(name)
        if g is None or any(name.startswith(n + ".") for n in qmods):
            continue
        if name == "lm_head.weight" and getattr(cfg, "tie_word_embeddings", False):
            continue
        data, raw_dtype = dense_tensor(t.detach().float().numpy(), src_types.get(g))
        w.add_tensor(g, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {**meta, "gguf_type": gguf_type, "layers_by_type": counts, "max_weight_error": max_err,
            "max_weight_error_in_steps": max_steps}
