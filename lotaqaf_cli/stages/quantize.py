"""Stage `quantize`: a 16-bit model and calibration windows -> the GPTQ-quantized model.

    check_shapes(shapes, quant)               before any work: the settings fit the layer shapes (from config)
    check_model(model, quant)                 the same on a loaded model's layers
    quantize(model, windows, quant, device)   -> (quantized copy of the model, per-layer stats)

Takes the recipe's `quant` section. The command layer (runner.py) loads the source, prepares the
calibration windows, looks up and fills the cache, and writes the record.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import torch
from omegaconf import DictConfig
from rich.table import Table

from .. import ui
from ..core.quantize_model import linear_layers, quantize_model
from ..errors import LotaqafError

SETTINGS = ("method", "bits", "group_size", "act_order", "static_groups", "true_sequential", "damp_percent",
            "block_size")


def settings(quant: DictConfig) -> dict:
    """The quantizer settings that determine the codes (cache key, provenance, checkpoint config)."""
    return {k: quant[k] for k in SETTINGS}


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
    """:func:`check_shapes` on the model's own linear layers."""
    check_shapes({n: (m.in_features, m.out_features) for n, m in linear_layers(model).items()}, quant)


def quantize(model: torch.nn.Module, windows: torch.Tensor, quant: DictConfig, device: torch.device):
    """A quantized deep copy of ``model`` (the source stays 16-bit) and the per-layer statistics."""
    check_model(model, quant)
    q = copy.deepcopy(model)
    n_layers = len(q.model.layers)
    with ui.progress_bar(f"GPTQ {quant.bits}-bit g{quant.group_size} ({quant.method}), per decoder layer",
                         n_layers, unit="layers") as adv:
        stats = quantize_model(q, list(windows.split(quant.batch_size)), bits=quant.bits,
                               group_size=quant.group_size, method=quant.method, act_order=quant.act_order,
                               static_groups=quant.static_groups, true_sequential=quant.true_sequential,
                               damp_percent=quant.damp_percent, block_size=quant.block_size, device=device,
                               progress=lambda *_: adv(1))
    return q, stats


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
