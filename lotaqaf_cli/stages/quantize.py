"""Stage `quantize`: a 16-bit model and calibration windows -> the GPTQ-quantized model.

    check_shapes(shapes, quant)               before any work: the settings fit the layer shapes (from config)
    check_model(model, quant)                 the same on a loaded model's layers
    quantize(model, windows, quant, device)   -> (quantized copy of the model, per-layer stats)
    quantize_streamed(skeleton, load_layer, emit_layer, windows, quant, device)
                                              -> per-layer stats; one decoder layer resident at a time
    quantize_nf4(model, quant, targets, dtype)  quant=nf4 (QLoRA's base, core/nf4.py): in place, no calibration

Both take ``activations_on_host``: the calibration activations kept in (pinned) host memory and moved
to the device one batch at a time, for when they do not fit beside the model; the codes are the same.

Takes the recipe's `quant` section. The command layer (chain.py) loads the source, prepares the
calibration windows, looks up and fills the cache, and writes the record.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import torch
from omegaconf import DictConfig
from rich.table import Table

from .. import ui
from ..core import quantize_model as qm
from ..core.quantize_model import linear_layers
from ..errors import LotaqafError

SETTINGS = ("method", "bits", "group_size", "act_order", "act_group_aware", "static_groups", "true_sequential",
            "damp_percent", "block_size", "mse")
MSE_AUTO_NORM = 2.0  # squared error: GPTQ's own objective, and 2.7x cheaper to search than its --mse norm 2.4


def _label(quant: DictConfig) -> str:
    return f"GPTQ {quant.bits}-bit g{quant.group_size} ({quant.method}), per decoder layer"


def settings(quant: DictConfig) -> dict:
    """The quantizer settings that determine the codes (cache key, provenance, checkpoint config).
    act_order decides the visiting order when it is on, so act_group_aware is recorded as off then;
    ``mse: auto`` is recorded as the norm it stands for."""
    s = {k: quant[k] for k in SETTINGS}
    s["act_group_aware"] = bool(s["act_group_aware"] and not s["act_order"])
    s["mse"] = float(mse_norm(quant.mse, quant.bits))
    return s


def mse_norm(mse, bits: int) -> float:
    """The range search's norm for ``quant.mse``: auto searches where the grid is coarse (2 and 3 bits),
    where clipping a few outliers for a finer step pays (docs/decisions.md); 4 and 8 bits keep min-max."""
    if mse == "auto":
        return MSE_AUTO_NORM if bits <= 3 else 0.0
    return float(mse)


def check_shapes(shapes: dict[str, tuple[int, int]], quant: DictConfig) -> None:
    """The settings fit layers of these (in_features, out_features): the group size divides every
    input size, and 3-bit packing has output sizes divisible by 32. One line naming a layer, else None."""
    g = quant.group_size
    for name, (d_in, d_out) in shapes.items():
        if g != -1 and d_in % g:
            fits = sorted({d for d in (32, 64, 128, 256) if all(i % d == 0 for i, _ in shapes.values())})
            raise LotaqafError(f"quant.group_size={g} does not divide the input size {d_in} of {name}"
                               + (f"; group sizes that fit: {', '.join(map(str, fits))} or -1" if fits else
                                  "; use quant.group_size=-1"))
        if quant.bits == 3 and d_out % 32:
            raise LotaqafError(f"3-bit GPTQ packing needs output sizes divisible by 32; {name} has {d_out}")


def check_model(model: torch.nn.Module, quant: DictConfig) -> None:
    """:func:`check_shapes` on the model's own linear layers (on the meta device too: shapes only)."""
    check_shapes({n: (m.in_features, m.out_features) for n, m in linear_layers(model).items()}, quant)


def quantize(model: torch.nn.Module, windows: torch.Tensor, quant: DictConfig, device: torch.device,
             split=None, activations_on_host: bool = False):
    """A quantized deep copy of ``model`` (the source stays 16-bit) and the per-layer statistics.
    ``split``: (mine, share) when several processes share the linears (core.quantize_model);
    ``activations_on_host``: the calibration activations in host memory, not on ``device``."""
    check_model(model, quant)
    q = copy.deepcopy(model)
    mine, share = split or (None, None)
    with ui.progress_bar(_label(quant), len(q.model.layers), unit="layers") as adv:
        stats = qm.quantize_model(q, list(windows.split(quant.batch_size)), device=device,
                                  progress=lambda *_: adv(1), mine=mine, share=share,
                                  activations_on_host=activations_on_host, **settings(quant))
    return q, stats


def quantize_streamed(skeleton: torch.nn.Module, load_layer, emit_layer, windows: torch.Tensor, quant: DictConfig,
                      device: torch.device, split=None, activations_on_host: bool = False):
    """The same quantization with one decoder layer in memory at a time: ``load_layer(i)`` reads layer
    i, ``emit_layer(i, layer)`` writes it quantized (the checkpoint grows shard by shard);
    ``split`` and ``activations_on_host`` as for :func:`quantize`."""
    mine, share = split or (None, None)
    with ui.progress_bar(_label(quant) + ", streamed", len(skeleton.model.layers), unit="layers") as adv:
        return qm.quantize_streamed(skeleton, list(windows.split(quant.batch_size)), load_layer, emit_layer,
                                    device=device, progress=lambda *_: adv(1), mine=mine, share=share,
                                    activations_on_host=activations_on_host, **settings(quant))


def summarize(stats) -> dict:
    by = defaultdict(list)
    for s in stats:
        by[s.kind].append(s)
    return {k: {"layers": len(v), "gptq_error": sum(s.gptq_error for s in v) / len(v),
                "rtn_error": sum(s.rtn_error for s in v) / len(v),
                "gptq_worse_than_rtn": sum(s.gptq_error > s.rtn_error for s in v)} for k, v in by.items()}


def show_table(per_kind: dict) -> None:
    t = Table(title="relative output error on calibration inputs (mean per layer type)")
    for col in ("layer", "n", "GPTQ", "RTN", "GPTQ/RTN"):
        t.add_column(col, justify="right" if col != "layer" else "left")
    for k, v in per_kind.items():
        ratio = v["gptq_error"] / v["rtn_error"] if v["rtn_error"] else float("nan")
        t.add_row(k, str(v["layers"]), f"{v['gptq_error']:.4g}", f"{v['rtn_error']:.4g}", f"{ratio:.3f}")
    if not ui.quiet():
        ui.console.print(t)



def quantize_nf4(model: torch.nn.Module, quant: DictConfig, targets, dtype: torch.dtype) -> list[str]:
    """Replace, in place, the targeted linears of ``model`` (from its float weights) by NF4 layers computing
    in ``dtype`` (core/nf4.py); returns their names."""
    from ..core.nf4 import quantize_model_nf4

    names = quantize_model_nf4(model, list(targets), compute_dtype=dtype, blocksize=quant.group_size)
    if not names:
        raise LotaqafError(f"no linear layer matches model.target_modules={list(targets)}")
    return names
