"""Stage `merge`: fold a trained adapter into its quantized base, one decoder layer at a time, with a
bit-exact certificate.

    merge(model, kind, windows=None, write_layer=None, read_layer=None) -> ({layer: stats}, certificate)
    unmerge(merged, merged_layers)                                      -> the base again (in place)

The merge runs in place: each decoder layer's adapter layers are replaced by their merged QuantLinears
and the layer is handed to ``write_layer(i, layer, merged)`` (a sharded checkpoint writer) before the
next one, so no second model is ever held. LoTA-QAF merges losslessly (codes + markers, zero points -
mu: core/merge.py), and so do the trained scales and zero points (core/quant_params.py: the same codes
with the trained s and z'); LoRA and QA-LoRA merges re-quantize, are reported with their loss, and their
adapter layers are put back afterwards (the adapter model is what a LoRA run evaluates).

The certificate, on the probe batch (core.merge.probe_batch):
- per layer: every merged layer's output on the adapter model's own activations at that layer, against
  the adapter layer's output (max |difference|); exactly 0.0 everywhere means, by induction over the
  layers, that the merged model computes what the adapter model computes;
- from disk: ``read_layer(i)`` re-reads decoder layer i's written shard, and its layers' outputs on the
  same activations are compared again;
- whole model: the max |logit difference| and, given held-out windows, both perplexities (the adapter
  model's measured before the merge, the merged model's after: one model in memory throughout).
A merge of an exact kind (io.adapter.EXACT_KINDS) whose differences are not all exactly 0.0 is refused
(nothing is renamed into place).
"""

from __future__ import annotations

import lotaqaf_kernels as kernels
import torch

from .. import __version__
from ..core.adapters import ADAPTER_LAYERS
from ..core.merge import (
    PROBE_SEED,
    PROBE_SHAPE,
    merge_ternary,
    probe_batch,
    probe_logits,
    requantize_lora,
    unmerge_model,
)
from ..core.perplexity import perplexity
from ..core.qlinear import replace_module
from ..core.quantize_model import decoder_layers
from ..errors import LotaqafError
from ..io.adapter import EXACT_KINDS
from ..precision import dtype_name


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _adapter_names(block: torch.nn.Module) -> list[str]:
    return [n for n, m in block.named_modules() if isinstance(m, ADAPTER_LAYERS)]


@torch.no_grad()
def _probe(model: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor], dict]:
    """One forward of the probe batch: the float32 logits, the hidden states entering each decoder layer
    and the keyword arguments the layers are called with (rotary embeddings, mask: the same for all)."""
    layers = decoder_layers(model)
    hidden: list[torch.Tensor] = []
    kwargs: dict = {}

    def hook(_module, args, kw):
        hidden.append((args[0] if args else kw["hidden_states"]).detach())
        if not kwargs:
            kwargs.update({k: v for k, v in kw.items()
                           if k not in ("hidden_states", "past_key_values", "past_key_value", "use_cache")})

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        ids = probe_batch(model.config.vocab_size).to(model_device(model))
        logits = model(input_ids=ids, use_cache=False).logits.float()
    finally:
        for h in handles:
            h.remove()
    return logits, hidden, kwargs


@torch.no_grad()
def _layer_io(block: torch.nn.Module, hidden: torch.Tensor, kwargs: dict, names: list[str]) -> dict:
    """(input, output) of each named submodule of ``block`` when the block runs on ``hidden``."""
    seen: dict = {}
    handles = [block.get_submodule(n).register_forward_hook(
        lambda _m, args, out, n=n: seen.__setitem__(n, (args[0].detach(), out.detach()))) for n in names]
    try:
        block(hidden, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def merge(model: torch.nn.Module, kind: str, windows: torch.Tensor | None = None, write_layer=None,
          read_layer=None) -> tuple[dict, dict]:
    """Merge ``model``'s adapters into its quantized layers, in place, decoder layer by decoder layer.
    ``write_layer(i, layer, merged)`` writes layer i (``merged``: its core.merge.MergedLayer by full name);
    ``read_layer(i)`` returns the QuantLinears written for layer i, by full name (None: no from-disk check).
    Returns ({full name: MergedLayer.stats} for LoTA-QAF, the certificate)."""
    exact = kind in EXACT_KINDS
    if exact and windows is not None:
        ppl_adapter, n_tokens = perplexity(model, windows)
    ref_logits, hidden, kwargs = _probe(model)
    stats: dict[str, dict] = {}
    lora_layers: dict[str, torch.nn.Module] = {}
    layer_diff, disk_diff = 0.0, None if read_layer is None else 0.0
    for i, block in enumerate(decoder_layers(model)):
        names = _adapter_names(block)
        io = _layer_io(block, hidden[i], kwargs, names)
        merged_here = {}
        for n in names:
            full = f"model.layers.{i}.{n}"
            adapter = block.get_submodule(n)
            if kind == "lota":
                merged_here[full] = merge_ternary(adapter)
                new = merged_here[full].layer
            elif exact:
                new = adapter.merged()
            else:
                new, lora_layers[full] = requantize_lora(adapter), adapter
            x, y = io[n]
            layer_diff = max(layer_diff, _max_diff(new(x), y))
            replace_module(block, n, new)
        if exact and layer_diff != 0.0:
            raise LotaqafError(f"merge verification failed at decoder layer {i}: a merged layer's output differs "
                               f"from its adapter layer's by {layer_diff:g} (expected 0.0); no merged checkpoint "
                               "written")
        if write_layer is not None:
            write_layer(i, block, merged_here)
        if read_layer is not None:
            for full, written in read_layer(i).items():
                n = full[len(f"model.layers.{i}."):]
                if n in io:
                    disk_diff = max(disk_diff, _max_diff(written.to(hidden[i].device)(io[n][0]), io[n][1]))
            if exact and disk_diff != 0.0:
                raise LotaqafError(f"merge verification failed on the written checkpoint at decoder layer {i}: "
                                   f"max |output difference| = {disk_diff:g}; no merged checkpoint written")
        stats.update({full: ml.stats for full, ml in merged_here.items()})
        del io, merged_here
    logit_diff = _max_diff(ref_logits, probe_logits(model))
    cert = {"kind": kind, "lotaqaf_version": __version__,
            "probe": {"seed": PROBE_SEED, "shape": list(PROBE_SHAPE), "dtype": dtype_name(model),
                      "device": model_device(model).type, "kernels": kernels.mode()},
            "max_abs_layer_diff": layer_diff, "max_abs_logit_diff": logit_diff}
    if disk_diff is not None:
        cert["max_abs_layer_diff_from_disk"] = disk_diff
    if windows is not None:
        ppl_merged, n_tokens = perplexity(model, windows)
        if not exact:  # the adapter model's, with its adapter layers back
            _restore(model, lora_layers)
            ppl_adapter, _ = perplexity(model, windows)
        cert["perplexity"] = {"adapter": ppl_adapter, "merged": ppl_merged, "change": ppl_merged - ppl_adapter,
                              "tokens": n_tokens}
    _restore(model, lora_layers)
    cert["exact"] = layer_diff == 0.0 and logit_diff == 0.0 and disk_diff in (None, 0.0)
    if stats:
        tot = {k: sum(s[k] for s in stats.values()) for k in ("plus", "minus", "zero", "blocked")}
        n = max(tot["plus"] + tot["minus"] + tot["zero"], 1)
        cert["codes"] = {**tot, "total": n, "changed_frac": (tot["plus"] + tot["minus"]) / n}
        cert["layers"] = stats
    if exact and logit_diff != 0.0:
        raise LotaqafError(f"merge verification failed: max |logit difference| = {logit_diff:g} (expected 0.0); "
                           "no merged checkpoint written")
    return stats, cert


def _restore(model: torch.nn.Module, layers: dict[str, torch.nn.Module]) -> None:
    """Put LoRA adapter layers back in place of their re-quantized merges (once)."""
    for name, m in layers.items():
        if model.get_submodule(name) is not m:
            replace_module(model, name, m)


def unmerge(merged: torch.nn.Module, merged_layers: dict) -> torch.nn.Module:
    """The base model again: markers subtracted from the codes, integer zero points restored."""
    if not merged_layers:
        raise LotaqafError("this checkpoint holds no merged LoTA-QAF layers (no markers): nothing to unmerge")
    unmerge_model(merged, merged_layers)
    return merged
