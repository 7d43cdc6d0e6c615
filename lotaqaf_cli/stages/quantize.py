"""Stage `quantize`: source model -> GPTQ checkpoint (cached by content under runs/_cache).

Reads: the model named by model.path, calibration text (calib.*).
Writes: runs/_cache/quantized/<key>/ (the checkpoint) and <run>/quantize.json (what was done).
"""

from __future__ import annotations

import copy
import shutil
import time
from collections import defaultdict

import torch
from rich.table import Table

from .. import __version__, ui
from ..core.quantize_model import check_group_size, quantize_model
from ..errors import LotaqafError
from ..io.checkpoint import load_quantized, save_quantized
from ..io.rundir import cache_key, versions
from .common import Context, load_source, pick_device, text_windows

QUANT_VERSION = "gptq-v1"  # bump when the quantizer's output for the same inputs changes


def run(ctx: Context) -> None:
    cfg, q = ctx.cfg, ctx.cfg.quant
    src = load_source(ctx)
    if src.quantized:
        ui.say(f"{cfg.model.path} is already a GPTQ checkpoint: skipping quantization")
        ctx.quantized, ctx.quantized_dir, ctx.quantized_hash = src.model, cfg.model.path, src.source_hash
        ctx.run.write_json("quantize.json", {"skipped": True, "checkpoint": cfg.model.path,
                                             "content_hash": src.source_hash})
        return
    bad = check_group_size(src.model, q.group_size)
    if bad:
        raise LotaqafError(f"quant.group_size={q.group_size} does not divide the input size of {bad}")
    if q.bits == 3:
        for name, m in src.model.named_modules():
            if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}" and m.out_features % 32:
                raise LotaqafError(f"3-bit GPTQ packing needs output sizes divisible by 32; {name} has "
                                   f"{m.out_features}")

    t0 = time.time()
    calib, calib_hash = text_windows(ctx, "calib", cfg.calib)
    ctx.timings["calib_s"] = round(time.time() - t0, 1)
    settings = {"method": q.method, "bits": q.bits, "group_size": q.group_size, "act_order": q.act_order,
                "static_groups": q.static_groups, "true_sequential": q.true_sequential,
                "damp_percent": q.damp_percent, "block_size": q.block_size}
    key = cache_key(QUANT_VERSION, src.source_hash, calib_hash, settings)
    out_dir = ctx.run.cache_path("quantized", key)

    cached = None
    if (out_dir / "quantize_config.json").is_file():
        try:
            with ui.status("loading the cached quantized base ..."):
                cached = load_quantized(out_dir)
        except LotaqafError as e:
            ui.say(f"[yellow]cached quantized base is unusable ({e}); quantizing again[/yellow]")
            shutil.rmtree(out_dir, ignore_errors=True)
    if cached is not None:
        model, _tok, info = cached
        ui.say(f"reusing the cached quantized base {out_dir} (same source, settings and calibration)")
        model.to(pick_device(cfg))
        ctx.quantized, ctx.quantized_dir, ctx.quantized_hash = model, str(out_dir), info["content_hash"]
        ctx.run.write_json("quantize.json", {"cached": True, "checkpoint": str(out_dir),
                                             "content_hash": info["content_hash"], "settings": settings})
        return

    device = pick_device(cfg)
    model = copy.deepcopy(src.model)
    batches = list(calib.split(q.batch_size))
    n_layers = len(model.model.layers)
    t0 = time.time()
    with ui.progress_bar(f"GPTQ {q.bits}-bit g{q.group_size} ({q.method}), per decoder layer", n_layers) as adv:
        stats = quantize_model(model, batches, bits=q.bits, group_size=q.group_size, method=q.method,
                               act_order=q.act_order, static_groups=q.static_groups,
                               true_sequential=q.true_sequential, damp_percent=q.damp_percent,
                               block_size=q.block_size, device=device, progress=lambda *_: adv(1))
    ctx.timings["quantize_s"] = round(time.time() - t0, 1)

    provenance = {"source": cfg.model.path, "source_hash": src.source_hash, "calibration": dict(cfg.calib),
                  "calibration_hash": calib_hash, "settings": settings, "lotaqaf_version": __version__,
                  "versions": versions()}
    with ui.status("writing the quantized checkpoint ..."):
        chash = save_quantized(model, src.tokenizer, out_dir, dict(settings), provenance)
    ctx.quantized, ctx.quantized_dir, ctx.quantized_hash = model, str(out_dir), chash

    per_kind = summarize(stats)
    show_table(per_kind)
    ctx.run.write_json("quantize.json", {
        "cached": False, "checkpoint": str(out_dir), "content_hash": chash, "settings": settings,
        "calibration_hash": calib_hash, "timings": dict(ctx.timings),
        "error_by_kind": per_kind, "layers": [s.__dict__ for s in stats]})
    ui.say(f"quantized base written to {out_dir} in {ctx.timings['quantize_s']} s")


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
