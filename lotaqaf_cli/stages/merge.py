"""Stage `merge`: fold a trained adapter into its quantized base, with a bit-exact certificate.

    merge(adapted, kind, windows=None)        -> (merged model, {layer: MergedLayer}, certificate)
    check_reloaded(reloaded, ref, kind, cert)  the from-disk half of the certificate
    unmerge(merged, merged_layers)            -> the base again (in place)

LoTA-QAF merges losslessly (codes + markers, zero points - mu: core/merge.py); the certificate is
the max |logit difference| between the adapter model and the merged model on a fixed probe batch
(and, when held-out windows are given, both perplexities), and a LoTA merge whose difference is not
exactly 0.0 is refused. LoRA and QA-LoRA merges re-quantize and are reported with their loss.
The command layer writes the checkpoint and reloads it for :func:`check_reloaded`.
"""

from __future__ import annotations

import copy

import lotaqaf_kernels as kernels
import torch

from .. import __version__
from ..core.merge import (
    PROBE_SEED,
    PROBE_SHAPE,
    compare_models,
    merge_lora_model,
    merge_model,
    probe_logits,
    unmerge_model,
)
from ..errors import LotaqafError
from ..precision import dtype_name


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def merge(adapted: torch.nn.Module, kind: str, windows: torch.Tensor | None = None):
    """A merged copy of ``adapted`` (which is left as it is), its merged layers and the certificate."""
    merged = copy.deepcopy(adapted)
    layers = merge_model(merged) if kind == "lota" else {}
    if kind != "lota":
        merge_lora_model(merged)
    measured = compare_models(adapted, merged, windows, names=("adapter", "merged"))
    diff = measured["max_abs_logit_diff"]
    cert = {"kind": kind, "lotaqaf_version": __version__,
            "probe": {"seed": PROBE_SEED, "shape": list(PROBE_SHAPE), "dtype": dtype_name(adapted),
                      "device": model_device(adapted).type, "kernels": kernels.mode()},
            **measured, "exact": diff == 0.0}
    if layers:
        per = {n: ml.stats for n, ml in layers.items()}
        tot = {k: sum(s[k] for s in per.values()) for k in ("plus", "minus", "zero", "blocked")}
        n = max(tot["plus"] + tot["minus"] + tot["zero"], 1)
        cert["codes"] = {**tot, "total": n, "changed_frac": (tot["plus"] + tot["minus"]) / n}
        cert["layers"] = per
    if kind == "lota" and diff != 0.0:
        raise LotaqafError(f"merge verification failed: max |logit difference| = {diff:g} (expected 0.0); "
                           "no merged checkpoint written")
    return merged, layers, cert


@torch.no_grad()
def check_reloaded(reloaded: torch.nn.Module, adapted: torch.nn.Module, kind: str, cert: dict) -> None:
    """Add the written checkpoint's difference to the certificate (refused unless 0.0 for LoTA-QAF); the
    reloaded model runs on the adapter model's device, so both use the same kernels."""
    reloaded.to(model_device(adapted))
    disk_diff = (probe_logits(reloaded) - probe_logits(adapted)).abs().max().item()
    cert["max_abs_logit_diff_from_disk"] = disk_diff
    if kind == "lota" and disk_diff != 0.0:
        raise LotaqafError(f"merge verification failed on the written checkpoint: max |logit difference| "
                           f"= {disk_diff:g}; no merged checkpoint written")


def unmerge(merged: torch.nn.Module, merged_layers: dict) -> torch.nn.Module:
    """The base model again: markers subtracted from the codes, integer zero points restored."""
    if not merged_layers:
        raise LotaqafError("this checkpoint holds no merged LoTA-QAF layers (no markers): nothing to unmerge")
    unmerge_model(merged, merged_layers)
    return merged
