"""GPTQ checkpoints: the layout gptqmodel writes and reads (the file format only; atomic writes and
manifests are io/files.py's).

Per quantized linear `name`: `name.qweight` int32 [D_in*bits/32, D_out], `name.qzeros` int32
[G, D_out*bits/32] holding z - 1 ("v1"), `name.scales` fp16 [G, D_out], `name.g_idx` int32 [D_in],
`name.bias` if any. Every other tensor in full precision. `quantize_config.json` has gptqmodel's
keys plus a `lotaqaf` provenance block; a checkpoint with fractional zero points declares
FLOAT_ZERO_DECLARATION instead of checkpoint_format gptq, so that plain GPTQ loaders refuse it.
`lotaqaf_manifest.json` holds the sha256 of every file so that a truncated or corrupted checkpoint
is detected on load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..core.qlinear import QuantLinear, quantized_modules, replace_module
from ..core.quant import pack_rows, pack_zeros_v1, unpack_zeros_v1
from ..errors import LotaqafError
from .files import atomic_dir, file_sha256, read_safetensors, verify_manifest, write_manifest
from .shards import rebuild_rotary

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
QUANT_CONFIG = "quantize_config.json"
# lotaqaf's names for the quantizer settings -> the keys of quantize_config.json (the file format's
# names: act_order is gptqmodel's desc_act). Only this module translates between the two.
SETTING_KEYS = {"bits": "bits", "group_size": "group_size", "act_order": "desc_act",
                "static_groups": "static_groups", "true_sequential": "true_sequential",
                "damp_percent": "damp_percent"}
SETTING_DEFAULTS = {"act_order": False, "static_groups": False, "true_sequential": False, "damp_percent": 0.01}


# A checkpoint with fractional zero points (a merged LoTA-QAF model with the offset factor) computes
# with its `zero_points` tensors, which plain GPTQ readers ignore: they would silently run the model
# with the integer qzeros instead. It declares a checkpoint format no plain GPTQ loader accepts
# (gptqmodel refuses an unknown checkpoint_format; transformers hands quant_method gptq to its GPTQ
# backend, which refuses it in turn; an unknown quant_method would instead make transformers skip
# quantization and load random weights); lotaqaf's loader reads it.
FLOAT_ZERO_DECLARATION = {
    "quant_method": "gptq", "checkpoint_format": "lotaqaf_float_zero",
    "lotaqaf_note": "GPTQ layout plus fractional zero points (<layer>.zero_points) that plain GPTQ engines "
                    "cannot hold; load it with lotaqaf, or see docs/formats.md for exact exports",
}


def is_checkpoint(directory: str | os.PathLike) -> bool:
    return (Path(directory) / QUANT_CONFIG).is_file()


def gptq_tensors(name: str, m: QuantLinear, merged=None) -> dict[str, torch.Tensor]:
    """The GPTQ tensors of one QuantLinear.

    A merged LoTA-QAF layer (``merged``: core.merge.MergedLayer) also gets `name.zero_points`
    (the fractional z' = z - mu, float32, used instead of qzeros when present) and `name.markers`
    (W_hat as 2-bit codes, for unmerge); its qzeros keep the base's integer z.
    """
    int_zeros = m.zeros.round() if merged is None else merged.int_zeros
    out = {
        f"{name}.qweight": m.qweight.detach() if m.gptq_packable else pack_rows(m.codes, m.bits),
        f"{name}.qzeros": pack_zeros_v1(int_zeros, m.bits),
        f"{name}.scales": m.scales.half(),
        f"{name}.g_idx": m.g_idx.to(torch.int32),
    }
    if m.bias is not None:
        out[f"{name}.bias"] = m.bias.detach()
    if merged is not None:
        out[f"{name}.markers"] = merged.markers_packed
    if not torch.equal(m.zeros.float(), int_zeros.float()):  # fractional zero points (merged model)
        out[f"{name}.zero_points"] = m.zeros.detach().float().contiguous()
    return out


def weight_files(ckpt_dir: str | os.PathLike) -> list[Path]:
    """The checkpoint's safetensors files: `model.safetensors`, or the shards its index names."""
    d = Path(ckpt_dir)
    index = d / INDEX
    if index.is_file():
        try:
            return sorted({d / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (json.JSONDecodeError, KeyError, TypeError):
            raise LotaqafError(f"{index} is corrupted") from None
    return [d / WEIGHTS] if (d / WEIGHTS).is_file() else []


def content_hash(ckpt_dir: str | os.PathLike) -> str:
    """Hash of a checkpoint's tensors and quantization config (what defines its outputs)."""
    d = Path(ckpt_dir)
    h = hashlib.sha256()
    names = [WEIGHTS] if (d / WEIGHTS).is_file() else [INDEX] + [f.name for f in weight_files(d)]
    for name in [*names, QUANT_CONFIG]:
        h.update(name.encode() + file_sha256(d / name).encode())
    return "sha256:" + h.hexdigest()


def _quantized_state(model: nn.Module, merged: dict | None, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a (partly) quantized module as the checkpoint stores it: the GPTQ tensors of
    each QuantLinear, everything else as it is. ``prefix`` is the module's name in the whole model."""
    tensors: dict[str, torch.Tensor] = {}
    skip = set()
    for name, m in quantized_modules(model).items():
        tensors.update(gptq_tensors(prefix + name, m, (merged or {}).get(prefix + name)))
        skip.update(f"{name}.{b}" for b in ("qweight", "scales", "zeros", "g_idx", "bias"))
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    for k, v in model.state_dict().items():
        if k in skip or (tied and k == "lm_head.weight"):
            continue
        tensors[prefix + k] = v.detach().contiguous()
    return tensors


def _write_configs(tmp: Path, config, tokenizer, settings: dict, provenance: dict, float_zeros: bool) -> None:
    full = {**SETTING_DEFAULTS, **{k: v for k, v in settings.items() if k in SETTING_KEYS}}
    qcfg = {SETTING_KEYS[k]: full[k] for k in SETTING_KEYS}
    qcfg.update({
        "sym": False, "lm_head": False, "pack_dtype": "int32",
        **(FLOAT_ZERO_DECLARATION if float_zeros else {"quant_method": "gptq", "checkpoint_format": "gptq"}),
        # gptqmodel loads an asymmetric v1 checkpoint only if it declares the zero-point encoding of
        # gptqmodel >= 0.9 (word-wise z - 1), which is exactly what pack_zeros_v1 writes (tested
        # bit for bit against gptqmodel's own files); see docs/decisions.md.
        "meta": {"quantizer": [f"lotaqaf:{__version__}", "gptqmodel:0.9.0"]},
        "lotaqaf": provenance,
    })
    cfg = config.to_dict()
    cfg["quantization_config"] = {k: v for k, v in qcfg.items() if k != "lotaqaf"}
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
    (tmp / QUANT_CONFIG).write_text(json.dumps(qcfg, indent=2, default=str) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    write_manifest(tmp)


def save_quantized(model: nn.Module, tokenizer, out_dir: str | os.PathLike, settings: dict,
                   provenance: dict, merged: dict | None = None) -> str:
    """Write a GPTQ checkpoint atomically; returns its content hash. ``settings`` are the quantizer
    settings in lotaqaf's names (bits, group_size, act_order, ...); ``merged`` maps layer names to
    core.merge.MergedLayer for a merged LoTA-QAF model."""
    from safetensors.torch import save_file

    if not quantized_modules(model):
        raise ValueError("model has no quantized layers")
    tensors = _quantized_state(model, merged)
    float_zeros = any(k.endswith(".zero_points") for k in tensors)
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        _write_configs(tmp, model.config, tokenizer, settings, provenance, float_zeros)
        chash = content_hash(tmp)
    return chash


class ShardedWriter:
    """A GPTQ checkpoint written one decoder layer at a time (streamed quantization): each layer
    becomes its own shard as soon as it is quantized, so nothing accumulates in memory. Use through
    :func:`sharded_checkpoint`; the directory appears under its final name only after `finish`."""

    def __init__(self, tmp: Path, num_layers: int):
        self.tmp, self.n_shards = tmp, num_layers + 1
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self.float_zeros = False
        self.chash: str | None = None

    def _shard(self, k: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        name = self._name(k)
        save_file(tensors, str(self.tmp / name), metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(tensors, name))
        self.total_size += sum(t.numel() * t.element_size() for t in tensors.values())
        self.float_zeros |= any(k.endswith(".zero_points") for k in tensors)

    def _name(self, k: int) -> str:
        return f"model-{k + 1:05d}-of-{self.n_shards:05d}.safetensors"

    def add_layer(self, i: int, layer: nn.Module, merged: dict | None = None) -> None:
        """Decoder layer ``i``, quantized (``merged``: its core.merge.MergedLayer by full name, for a merged
        LoTA-QAF layer): written now, as shard i + 1."""
        self._shard(i, {k: v.cpu() for k, v in _quantized_state(layer, merged, f"model.layers.{i}.").items()})

    def read_layer(self, i: int, bits: int, group_size: int) -> dict[str, QuantLinear]:
        """The QuantLinears of decoder layer ``i`` as its written shard holds them (by full name)."""
        return quant_linears(read_safetensors(self.tmp / self._name(i)), bits, group_size)[0]

    def finish(self, skeleton: nn.Module, tokenizer, settings: dict, provenance: dict) -> str:
        """Everything outside the decoder layers (embeddings, final norm, lm_head), the index and the
        configs; returns the content hash."""
        rest = {k: v.detach().contiguous().cpu() for k, v in skeleton.state_dict().items()
                if not k.startswith("model.layers.")
                and not (k == "lm_head.weight" and skeleton.config.tie_word_embeddings)}
        self._shard(self.n_shards - 1, rest)
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        _write_configs(self.tmp, skeleton.config, tokenizer, settings, provenance, self.float_zeros)
        self.chash = content_hash(self.tmp)
        return self.chash


@contextlib.contextmanager
def sharded_checkpoint(out_dir: str | os.PathLike, num_layers: int):
    """Yield a :class:`ShardedWriter` into a temporary directory, renamed to ``out_dir`` only when the
    block ends after `finish` (an interrupted quantization leaves nothing under ``out_dir``)."""
    with atomic_dir(out_dir) as tmp:
        w = ShardedWriter(tmp, num_layers)
        yield w
        if w.chash is None:
            raise RuntimeError("sharded_checkpoint: finish() was not called")


def quant_linears(state: dict[str, torch.Tensor], bits: int, group_size: int) -> tuple[dict, dict]:
    """The QuantLinears a checkpoint's tensors hold, by name (their tensors are popped from ``state``), and,
    for merged LoTA-QAF layers, what unmerge needs (``markers_packed``, ``int_zeros``) by name."""
    layers, merged = {}, {}
    for name in [k[: -len(".qweight")] for k in state if k.endswith(".qweight")]:
        qweight, qzeros = state.pop(f"{name}.qweight"), state.pop(f"{name}.qzeros")
        scales, g_idx = state.pop(f"{name}.scales").float(), state.pop(f"{name}.g_idx", None)
        bias = state.pop(f"{name}.bias", None)
        zero_points = state.pop(f"{name}.zero_points", None)
        markers = state.pop(f"{name}.markers", None)
        d_in, d_out = qweight.shape[0] * 32 // bits, qweight.shape[1]
        if g_idx is None:
            g_idx = torch.arange(d_in, dtype=torch.int32) // (d_in if group_size <= 0 else group_size)
        int_zeros = unpack_zeros_v1(qzeros, bits, d_out).float()
        zeros = int_zeros if zero_points is None else zero_points.float()
        if markers is not None:  # a merged LoTA-QAF layer: what unmerge needs
            merged[name] = {"markers_packed": markers, "int_zeros": int_zeros}
        layers[name] = QuantLinear.from_packed(qweight, d_in, scales, zeros, g_idx, bits, group_size,
                                               None if bias is None else bias.float())
    return layers, merged


def load_quantized(ckpt_dir: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Load a GPTQ checkpoint (lotaqaf's or gptqmodel's) into a model of QuantLinear layers, its other
    tensors (embeddings, norms, lm_head) in ``dtype`` (a run passes its precision, so that a 16-bit
    checkpoint's embeddings are never held twice, once as stored and once upcast).

    Returns (model, tokenizer or None, info) where info holds the quantize config and content hash.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    d = Path(ckpt_dir)
    verify_manifest(d)
    try:
        qcfg = json.loads((d / QUANT_CONFIG).read_text())
        bits, group_size = int(qcfg["bits"]), int(qcfg["group_size"])
    except (OSError, json.JSONDecodeError, KeyError, ValueError):
        raise LotaqafError(f"{d}/{QUANT_CONFIG} is missing or unreadable") from None
    files = weight_files(d)
    if not files:
        raise LotaqafError(f"{d} holds no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(read_safetensors(f))

    config = AutoConfig.from_pretrained(str(d))
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):  # nothing allocated for the 16-bit linears: they become QuantLinears below
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    layers, merged = quant_linears(state, bits, group_size)
    names = list(layers)
    for name, layer in layers.items():
        replace_module(model, name, layer)
    for k in list(state):  # one tensor at a time: the stored one is dropped as its cast copy is made
        state[k] = state[k].to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    quant_buffers = {f"{n}.{b}" for n in names for b in ("qweight", "scales", "zeros", "g_idx", "bias")}
    missing = [k for k in missing if k not in quant_buffers
               and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise LotaqafError(f"{d}: checkpoint does not match its config (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    rebuild_rotary(model, torch.device("cpu"))
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise LotaqafError(f"{d}: checkpoint does not match its config (no tensor for {empty[:3]})")
    model.eval()
    tok = None
    if (d / "tokenizer_config.json").is_file() or (d / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(d))
    chash = content_hash(d)
    settings = {k: qcfg.get(f, SETTING_DEFAULTS.get(k)) for k, f in SETTING_KEYS.items()}
    return model, tok, {"quantize_config": qcfg, "settings": settings, "provenance": qcfg.get("lotaqaf", {}),
                        "content_hash": chash, "merged": merged}


def quantized_tensor_hash(ckpt_dir: str | os.PathLike) -> str:
    """sha256 over the quantized tensors only (qweight, qzeros, scales, g_idx, zero_points, markers),
    name by name: equal for two checkpoints that hold the same quantized model."""
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(ckpt_dir):
        state.update(read_safetensors(f))
    h = hashlib.sha256()
    for k in sorted(state):
        if k.endswith((".qweight", ".qzeros", ".scales", ".g_idx", ".zero_points", ".markers")):
            t = state[k].contiguous()
            h.update(k.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode() + t.numpy().tobytes())
    return "sha256:" + h.hexdigest()
