"""torchao export: the merged model in torchao's `IntxUnpackedToInt8Tensor` layout, which transformers
loads with `AutoModelForCausalLM.from_pretrained(DIR)` (torchao installed) and computes with the
fractional zero points: W = (qdata - zero_point) * scale per [1, group_size] block.

Written directly from the merged layers (torchao is needed to load, not to write). Per quantized linear
M, in one `model.safetensors`:
    M._weight_qdata       int8 [D_out, D_in]   the codes 0 .. 2^bits - 1 (unpacked: 8 bits a weight)
    M._weight_scale       fp16 [D_out, G]      lotaqaf's scales (fp16-exact already)
    M._weight_zero_point  fp32 [D_out, G]      the fractional zero points z' as lotaqaf holds them
and the safetensors header metadata that torchao's loader reads: per weight the tensor subclass and
its fields (target_dtype int{bits+1}, so that the unshifted codes are in range; block_size [1, gs];
dtype float32, the dtype torchao dequantizes in), `{"_type": "Tensor"}` for plain tensors, and
`tensor_names`. config.json carries a `quantization_config` of quant_method torchao (IntxWeightOnly).
Every stored value is the merged model's own, so the export is exact up to float32 arithmetic.
Contiguous groups only (no act-order).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.qlinear import QuantLinear, quantized_modules
from ..errors import LotaqafError


def contiguous_groups(q: QuantLinear) -> bool:
    gs = q.group_size if q.group_size > 0 else q.in_features
    return q.in_features % gs == 0 and torch.equal(q.g_idx.long(), torch.arange(q.in_features) // gs)


def intx_weight(q: QuantLinear) -> tuple[dict[str, torch.Tensor], dict]:
    """The three stored tensors of one layer and its metadata entry."""
    gs = q.group_size if q.group_size > 0 else q.in_features
    tensors = {"qdata": q.codes.t().to(torch.int8).contiguous(),
               "scale": q.scales.t().to(torch.float16).contiguous(),
               "zero_point": q.zeros.t().to(torch.float32).contiguous()}
    meta = {"_type": "IntxUnpackedToInt8Tensor",
            "_data": {"target_dtype": {"_type": "torch.dtype", "_data": f"int{q.bits + 1}"},
                      "block_size": [1, gs], "dtype": {"_type": "torch.dtype", "_data": "float32"},
                      "activation_quantization": None},
            "_tensor_data_names": list(tensors)}
    return tensors, meta


def quantization_config(group_size: int) -> dict:
    """A torchao IntxWeightOnlyConfig as transformers serializes it (what makes transformers hand the
    checkpoint to torchao; the per-layer widths and groups come from the tensor metadata)."""
    return {"quant_method": "torchao", "include_input_output_embeddings": False, "modules_to_not_convert": None,
            "untie_embedding_weights": False,
            "quant_type": {"default": {"_type": "IntxWeightOnlyConfig", "_version": 2, "_data": {
                "weight_dtype": {"_type": "torch.dtype", "_data": "int4"},
                "granularity": {"_type": "PerGroup", "_version": 1, "_data": {"group_size": group_size}},
                "mapping_type": {"_type": "MappingType", "_data": "ASYMMETRIC"},
                "scale_dtype": None,
                "intx_packing_format": {"_type": "IntxPackingFormat", "_data": "UNPACKED_TO_INT8"},
                "intx_choose_qparams_algorithm": {"_type": "IntxChooseQParamsAlgorithm", "_data": "AFFINE"}}}}}


def export_torchao(model, tokenizer, out_dir: Path, exact: tuple = ("hf16",)) -> dict:
    from safetensors.torch import save_file

    qmods = quantized_modules(model)
    bad = [n for n, q in qmods.items() if not contiguous_groups(q)]
    if bad:
        raise LotaqafError(f"torchao export needs contiguous groups; {bad[0]} has act-order groups; "
                           f"exact instead: --format {' or '.join(exact)}")
    tied = getattr(model.config, "tie_word_embeddings", False)
    tensors, metadata = {}, {}
    for name, t in model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if owner in qmods:
            if leaf == "bias":
                tensors[name] = t.detach().float().contiguous()
                metadata[name] = json.dumps({"_type": "Tensor"})
            continue  # codes, scales, zeros: written per layer below
        if name == "lm_head.weight" and tied:
            continue
        tensors[name] = t.detach().float().contiguous()
        metadata[name] = json.dumps({"_type": "Tensor"})
    for name, q in qmods.items():
        parts, meta = intx_weight(q)
        tensors.update({f"{name}._weight_{k}": v for k, v in parts.items()})
        metadata[f"{name}.weight"] = json.dumps(meta)
    metadata["tensor_names"] = json.dumps(list(metadata))
    save_file(tensors, str(out_dir / "model.safetensors"), metadata=metadata)
    cfg = model.config.to_dict()
    cfg["dtype"] = "float32"
    cfg["quantization_config"] = quantization_config(next(iter(qmods.values())).group_size)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return {"layers": len(qmods), "layout": "torchao IntxUnpackedToInt8Tensor (codes int8, scale fp16, zero_point fp32)"}
