"""GPTQ checkpoints (the layout gptqmodel writes and reads) and atomic writes.

Per quantized linear `name`: `name.qweight` int32 [D_in*bits/32, D_out], `name.qzeros` int32
[G, D_out*bits/32] holding z - 1 ("v1"), `name.scales` fp16 [G, D_out], `name.g_idx` int32 [D_in],
`name.bias` if any. Every other tensor in full precision. `quantize_config.json` has gptqmodel's
keys plus a `lotaqaf` provenance block; `lotaqaf_manifest.json` holds the sha256 of every file so
that a truncated or corrupted checkpoint is detected on load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..core.qlinear import QuantLinear, replace_module
from ..core.quant import pack_rows, pack_zeros_v1, unpack_rows, unpack_zeros_v1
from ..errors import LotaqafError
from .models import file_sha256

MANIFEST = "lotaqaf_manifest.json"
WEIGHTS = "model.safetensors"


# ---------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------

def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike):
    """Yield a temporary sibling directory; rename it to ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def gptq_tensors(name: str, m: QuantLinear, merged=None) -> dict[str, torch.Tensor]:
    """The GPTQ tensors of one QuantLinear.

    A merged LoTA-QAF layer (``merged``: core.merge.MergedLayer) also gets `name.zero_points`
    (the fractional z' = z - mu, float32, used instead of qzeros when present) and `name.markers`
    (W_hat as 2-bit codes, for unmerge); its qzeros keep the base's integer z.
    """
    int_zeros = m.zeros.round() if merged is None else merged.int_zeros
    out = {
        f"{name}.qweight": pack_rows(m.codes, m.bits),
        f"{name}.qzeros": pack_zeros_v1(int_zeros, m.bits),
        f"{name}.scales": m.scales.half(),
        f"{name}.g_idx": m.g_idx.to(torch.int32),
    }
    if m.bias is not None:
        out[f"{name}.bias"] = m.bias.detach().clone()
    if merged is not None:
        from .adapter import pack_ternary

        out[f"{name}.markers"] = pack_ternary(merged.markers)
    if not torch.equal(m.zeros.float(), int_zeros.float()):  # fractional zero points (merged model)
        out[f"{name}.zero_points"] = m.zeros.detach().float().contiguous().clone()
    return out


def content_hash(ckpt_dir: str | os.PathLike) -> str:
    """Hash of a checkpoint's tensors and quantization config (what defines its outputs)."""
    d = Path(ckpt_dir)
    h = hashlib.sha256()
    for name in (WEIGHTS, "quantize_config.json"):
        h.update(name.encode() + file_sha256(d / name).encode())
    return "sha256:" + h.hexdigest()


def save_quantized(model: nn.Module, tokenizer, out_dir: str | os.PathLike, quant_config: dict,
                   provenance: dict, merged: dict | None = None) -> str:
    """Write a GPTQ checkpoint atomically; returns its content hash. ``merged`` maps layer names
    to core.merge.MergedLayer for a merged LoTA-QAF model."""
    from safetensors.torch import save_file

    qmods = quantized_modules(model)
    if not qmods:
        raise ValueError("model has no quantized layers")
    tensors: dict[str, torch.Tensor] = {}
    skip = set()
    for name, m in qmods.items():
        tensors.update(gptq_tensors(name, m, (merged or {}).get(name)))
        skip.update(f"{name}.{b}" for b in ("codes", "scales", "zeros", "g_idx", "bias"))
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for k, v in model.state_dict().items():
        if k in skip or (tied and k == "lm_head.weight"):
            continue
        tensors[k] = v.detach().contiguous().clone()

    qcfg = {
        "bits": quant_config["bits"], "group_size": quant_config["group_size"],
        "desc_act": quant_config["act_order"], "sym": False, "lm_head": False,
        "static_groups": quant_config.get("static_groups", False),
        "true_sequential": quant_config.get("true_sequential", False),
        "damp_percent": quant_config.get("damp_percent", 0.01),
        "quant_method": "gptq", "checkpoint_format": "gptq", "pack_dtype": "int32",
        # gptqmodel loads an asymmetric v1 checkpoint only if it declares the zero-point encoding of
        # gptqmodel >= 0.9 (word-wise z - 1), which is exactly what pack_zeros_v1 writes (tested
        # bit for bit against gptqmodel's own files); see docs/decisions.md.
        "meta": {"quantizer": [f"lotaqaf:{__version__}", "gptqmodel:0.9.0"]},
        "lotaqaf": provenance,
    }
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        cfg = model.config.to_dict()
        cfg["quantization_config"] = {k: v for k, v in qcfg.items() if k != "lotaqaf"}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
        (tmp / "quantize_config.json").write_text(json.dumps(qcfg, indent=2, default=str) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        manifest = {f.name: file_sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        chash = content_hash(tmp)
    return chash


def verify_manifest(ckpt_dir: Path) -> None:
    mf = ckpt_dir / MANIFEST
    if not mf.is_file():
        return  # written by another tool (gptqmodel): nothing to check against
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError:
        raise LotaqafError(f"{mf} is corrupted (not JSON)") from None
    for name, digest in manifest.items():
        f = ckpt_dir / name
        if not f.is_file():
            raise LotaqafError(f"checkpoint {ckpt_dir} is incomplete: {name} is missing")
        if file_sha256(f) != digest:
            raise LotaqafError(f"checkpoint {ckpt_dir} is corrupted: {name} does not match its recorded sha256 "
                               "(truncated or modified)")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise LotaqafError(f"cannot read {path}: corrupted or truncated safetensors file ({str(e)[:120]})") from None




def load_quantized(ckpt_dir: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Load a GPTQ checkpoint (lotaqaf's or gptqmodel's) into a model of QuantLinear layers.

    Returns (model, tokenizer or None, info) where info holds the quantize config and content hash.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    d = Path(ckpt_dir)
    verify_manifest(d)
    try:
        qcfg = json.loads((d / "quantize_config.json").read_text())
        bits, group_size = int(qcfg["bits"]), int(qcfg["group_size"])
    except (OSError, json.JSONDecodeError, KeyError, ValueError):
        raise LotaqafError(f"{d}/quantize_config.json is missing or unreadable") from None
    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({d / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = [d / WEIGHTS] if (d / WEIGHTS).is_file() else []
    if not files:
        raise LotaqafError(f"{d} holds no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(read_safetensors(f))

    config = AutoConfig.from_pretrained(str(d))
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    names = [k[: -len(".qweight")] for k in state if k.endswith(".qweight")]
    for name in names:
        qweight, qzeros = state.pop(f"{name}.qweight"), state.pop(f"{name}.qzeros")
        scales, g_idx = state.pop(f"{name}.scales").float(), state.pop(f"{name}.g_idx", None)
        bias = state.pop(f"{name}.bias", None)
        zero_points = state.pop(f"{name}.zero_points", None)
        state.pop(f"{name}.markers", None)
        d_in, d_out = qweight.shape[0] * 32 // bits, qweight.shape[1]
        if g_idx is None:
            g_idx = torch.arange(d_in, dtype=torch.int32) // (d_in if group_size <= 0 else group_size)
        codes = unpack_rows(qweight, bits, d_in)
        zeros = unpack_zeros_v1(qzeros, bits, d_out).float() if zero_points is None else zero_points.float()
        replace_module(model, name, QuantLinear.from_quantized(codes, scales, zeros, g_idx, bits, group_size,
                                                            None if bias is None else bias.float()))
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    quant_buffers = {f"{n}.{b}" for n in names for b in ("codes", "scales", "zeros", "g_idx", "bias")}
    missing = [k for k in missing if k not in quant_buffers
               and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise LotaqafError(f"{d}: checkpoint does not match its config (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    tok = None
    if (d / "tokenizer_config.json").is_file() or (d / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(d))
    chash = content_hash(d) if (d / WEIGHTS).is_file() else "sha256:" + file_sha256(files[0])
    return model, tok, {"quantize_config": qcfg, "content_hash": chash, "bits": bits, "group_size": group_size}


def quantized_tensor_hash(ckpt_dir: str | os.PathLike) -> str:
    """sha256 over the quantized tensors only (qweight, qzeros, scales, g_idx, zero_points, markers),
    name by name: equal for two checkpoints that hold the same quantized model."""
    state = read_safetensors(Path(ckpt_dir) / WEIGHTS)
    h = hashlib.sha256()
    for k in sorted(state):
        if k.endswith((".qweight", ".qzeros", ".scales", ".g_idx", ".zero_points", ".markers")):
            t = state[k].contiguous()
            h.update(k.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode() + t.numpy().tobytes())
    return "sha256:" + h.hexdigest()


def unmerge_state(state: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """Tensors of a merged checkpoint -> the base's: codes - markers, integer zeros, no extras."""
    from .adapter import unpack_ternary

    out = dict(state)
    for k in [k for k in state if k.endswith(".markers")]:
        name = k[: -len(".markers")]
        qweight = state[f"{name}.qweight"]
        d_in, d_out = qweight.shape[0] * 32 // bits, qweight.shape[1]
        codes = unpack_rows(qweight, bits, d_in).to(torch.int16)
        codes -= unpack_ternary(state[k], (d_in, d_out)).to(torch.int16)
        out[f"{name}.qweight"] = pack_rows(codes, bits)
        out.pop(k)
        out.pop(f"{name}.zero_points", None)
    return out
