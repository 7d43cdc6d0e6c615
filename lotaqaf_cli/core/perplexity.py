"""Perplexity over fixed-length windows: exp(mean next-token negative log-likelihood)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress=None) -> tuple[float, int]:
    """(perplexity, number of scored tokens) of ``model`` on token windows [n, seq_len].

    Every window is scored independently; token t is predicted from tokens < t of its window, so
    each window contributes seq_len - 1 scored tokens.
    """
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for b0 in range(0, windows.shape[0], batch_size):
        ids = windows[b0:b0 + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                              reduction="sum")
        total_nll += float(nll)
        total_tokens += ids[:, 1:].numel()
        if progress:
            progress(ids.shape[0])
    return math.exp(total_nll / total_tokens), total_tokens
