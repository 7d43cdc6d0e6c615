"""Stage `ppl`: held-out perplexity of the 16-bit and the quantized model on the same windows.

Reads: held-out text (ppl.*; never used for calibration or training), the context's models.
Writes: <run>/ppl.json.
"""

from __future__ import annotations

import time

from rich.table import Table

from .. import ui
from ..core.perplexity import perplexity
from .common import Context, load_source, text_windows


def run_ppl(ctx: Context) -> dict:
    cfg = ctx.cfg
    src = load_source(ctx)
    windows, digest = text_windows(ctx, "heldout", cfg.ppl)
    models = {} if src.quantized else {"16-bit": src.model}
    if ctx.quantized is not None:
        models[f"GPTQ INT{cfg.quant.bits} g{cfg.quant.group_size}"] = ctx.quantized
    if ctx.adapted is not None:
        models[f"GPTQ + {cfg.adapter.name} (adapter)"] = ctx.adapted
    results = {}
    for label, model in models.items():
        t0 = time.time()
        with ui.progress_bar(f"perplexity, {label}", windows.shape[0]) as adv:
            ppl, n_tok = perplexity(model, windows, cfg.ppl.batch_size, progress=adv)
        results[label] = {"ppl": ppl, "tokens": n_tok, "seconds": round(time.time() - t0, 1)}
    out = {"heldout_hash": digest, "n_samples": windows.shape[0], "seq_len": windows.shape[1],
           "source": cfg.ppl.source, "results": results}
    ctx.run.write_json("ppl.json", out)
    t = Table(title=f"held-out perplexity ({windows.shape[0]} x {windows.shape[1]} tokens, source={cfg.ppl.source})")
    t.add_column("model")
    t.add_column("perplexity", justify="right")
    t.add_column("tokens", justify="right")
    for label, r in results.items():
        t.add_row(label, f"{r['ppl']:.3f}", str(r["tokens"]))
    if not ui.quiet():
        ui.console.print(t)
    return out
