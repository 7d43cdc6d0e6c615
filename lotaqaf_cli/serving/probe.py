"""The serving check's probe: the same 8 prompts in lotaqaf and in the engine, 32 greedy tokens each.

    probe_prompts(tokenizer, vocab)                 -> the prompts as token ids
    reference_probe(model, prompts, ...)            -> lotaqaf's greedy continuations and logits, exact
    compare_probe(ref_conts, ref_logits, g, logits) -> agreement token for token, largest |logit diff|
    reference(model, held, tokenizer)               -> the reference for the engines, and what storage
                                                       alone changes (the bar an engine is measured against)
"""

from __future__ import annotations

import lotaqaf_kernels as kernels
import numpy as np
import torch
from torch import nn

from .. import memory, ui
from ..core.qlinear import dense_bytes, dequantized_model
from .child import forced_logits, greedy_continuations, hf_forward

PROBE_TEXTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Photosynthesis is the process by which",
    "Question: What is 17 + 25?\nAnswer:",
    "Once upon a time, in a small village,",
    "The three laws of thermodynamics state that",
    "Translate to French: I would like a cup of coffee.\n",
    "A list of prime numbers: 2, 3, 5,",
)
PROBE_NEW_TOKENS = 32


def probe_prompts(tokenizer, vocab_size: int) -> list[list[int]]:
    """The 8 probe prompts as token ids (a model without a tokenizer: 8 fixed random prompts)."""
    if tokenizer is not None:
        return [tokenizer(t)["input_ids"] for t in PROBE_TEXTS]
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab_size, (6 + i,), generator=g).tolist() for i in range(len(PROBE_TEXTS))]


def reference_probe(model: nn.Module, prompts: list[list[int]], new_tokens: int = PROBE_NEW_TOKENS,
                    dense: bool = False, forced_on: list[list[int]] | None = None):
    """The model's greedy continuations of the prompts and its logits predicting each token of
    ``forced_on`` (default: of its own continuations), computed exactly: dequantized weights, float32
    matmuls (kernels "torch"; the CPU decode kernel would round activations and scales to bf16).
    ``dense``: dequantize every layer once into a float32 copy (4 bytes a weight; the same values,
    and much faster than dequantizing at every call). lotaqaf's reference is the merged model's;
    the same probe on another model with ``forced_on`` = the reference's continuations is what an
    engine check measures."""
    if dense:
        model = dequantized_model(model)
    fwd = hf_forward(model)
    previous = kernels.mode()
    kernels.set_mode("torch")
    try:
        conts = greedy_continuations(fwd, prompts, new_tokens)
        return conts, [lg.numpy() for lg in forced_logits(fwd, prompts, forced_on or conts)]
    finally:
        kernels.set_mode(previous)


def compare_probe(ref_conts, ref_logits, greedy, logits) -> dict:
    """Token-for-token agreement of the engine's greedy continuations with lotaqaf's, and the largest
    |logit difference| teacher-forced on lotaqaf's continuations."""
    same = [list(a) == list(b) for a, b in zip(ref_conts, greedy, strict=True)]
    first = [next((k for k, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
             for a, b in zip(ref_conts, greedy, strict=True)]
    diff = max(float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
               for a, b in zip(ref_logits, logits, strict=True))
    return {"prompts": len(ref_conts), "new_tokens": len(ref_conts[0]), "same_continuations": int(sum(same)),
            "first_divergence": {str(i): k for i, k in enumerate(first) if k is not None},
            "max_abs_logit_diff": diff}


def reference(model: nn.Module, held: nn.Module, tokenizer) -> tuple[tuple, dict]:
    """((prompts, lotaqaf's greedy continuations, its logits), the same probe run on the values the files
    hold (``held``) compared with it): the reference every engine is compared with, and what storage alone
    changes. The model is dequantized once when a float32 copy takes under a quarter of the device's memory."""
    prompts = probe_prompts(tokenizer, model.config.vocab_size)
    dense = dense_bytes(model) < (memory.capacity_bytes(next(model.parameters()).device) or 0) / 4
    with ui.status("lotaqaf's greedy continuations of the probe prompts ..."):
        conts, logits = reference_probe(model, prompts, dense=dense)
        storage = compare_probe(conts, logits, *reference_probe(held, prompts, dense=dense, forced_on=conts))
    return (prompts, conts, logits), storage
