"""The training loss of a causal LM, computed in chunks of tokens so that the logits of a whole
micro-batch (tokens x vocab, upcast to float32, with their softmax and gradient) never exist at once.

    CHUNK_BYTES = 256 MiB            what one chunk's float32 logits may take
    chunk_tokens(vocab, budget_bytes=CHUNK_BYTES)
                                     -> tokens per chunk: the most whose float32 logits fit the budget, a
                                        multiple of 64 when that is at least 64 (vocab 128256: 512;
                                        vocab 49152: 1344)
    chunked_cross_entropy(hidden, weight, labels, chunk_tokens, ignore_index=-100)
                                     -> the mean cross-entropy (float32 scalar) of the logits
                                        hidden @ weight.T over the labels != ignore_index
    causal_lm_loss(model, input_ids, attention_mask, labels, chunk_tokens=None)
                                     -> what model(input_ids=..., attention_mask=..., labels=...).loss is
                                        for a transformers *ForCausalLM, computed with chunked_cross_entropy

chunked_cross_entropy is an autograd function: forward computes each chunk's logits (in hidden's dtype,
as the lm_head's nn.Linear does), upcasts them to float32, takes the log-softmax at the labels and
keeps only the float32 sum; backward computes each chunk's logits again and turns softmax - onehot into
the gradients of hidden and (where it requires grad) of weight. It keeps only hidden, weight and labels.
Rows whose label is ignore_index are never computed (their gradient is 0), so a masked prompt costs
nothing in the lm_head. The reduction is transformers' ForCausalLMLoss without num_items_in_batch:
the sum over the labeled rows divided by their number; with no labeled row that is 0 / 0 = nan, as
torch's cross_entropy gives (and the gradients are 0, as there).
No I/O here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
CHUNK_BYTES = 256 * 2**20  # one chunk's float32 logits; backward holds about three such buffers at once
                           # (log-probabilities, their gradient, the gradient's input)


def chunk_tokens(vocab: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per chunk: the most whose float32 logits (tokens x ``vocab`` x 4 bytes) fit in
    ``budget_bytes``, rounded down to a multiple of 64 when that is at least 64; never below 1."""
    n = budget_bytes // (4 * vocab)
    return n - n % 64 if n >= 64 else max(1, n)


_default_chunk = chunk_tokens  # causal_lm_loss's argument of that name hides it there


def _log_probs(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """float32 log-softmax of one chunk's logits (computed in h's dtype, as nn.Linear would)."""
    return torch.log_softmax(F.linear(h, weight).float(), dim=-1)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, size, ignore_index):
        labeled = labels != ignore_index
        picked = torch.zeros(labels.shape[0], 1, dtype=torch.float32, device=hidden.device)
        for rows in labeled.nonzero().squeeze(1).split(size):
            picked[rows] = _log_probs(hidden[rows], weight).gather(1, labels[rows].unsqueeze(1))
        ctx.save_for_backward(hidden, weight, labels)
        ctx.size, ctx.ignore_index = size, ignore_index
        # the labeled rows' log-probabilities summed and divided by their number as cross_entropy does on
        # the whole logits (nll_loss's mean, the same rows in the same places): the same float32 result
        return F.nll_loss(picked, torch.where(labeled, 0, ignore_index), ignore_index=ignore_index)

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, labels = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if want_h else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        rows_all = (labels != ctx.ignore_index).nonzero().squeeze(1)
        scale = grad_output.float() / rows_all.numel()  # as nll_loss's backward scales (mean reduction)
        for rows in rows_all.split(ctx.size):
            h = hidden[rows]
            logp = _log_probs(h, weight)
            onehot = torch.zeros_like(logp)
            onehot[torch.arange(len(rows), device=logp.device), labels[rows]] = -scale
            # (softmax - onehot) * scale, by the kernel of log_softmax's own backward (bit for bit what
            # cross_entropy's backward gives), cast to the activations' dtype as the upcast's backward does
            d = torch._log_softmax_backward_data(onehot, logp, -1, torch.float32).to(hidden.dtype)
            del logp, onehot
            if want_h:
                grad_hidden[rows] = d @ weight
            if want_w:
                grad_weight += (d.T @ h).float()
        if want_w:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
                          ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of the logits ``hidden @ weight.T`` (hidden [N, H], a bias-free lm_head's
    weight [V, H], labels [N]) over the rows whose label is not ``ignore_index``, ``chunk_tokens`` rows
    at a time: a float32 scalar. ``weight`` may be frozen or require grad."""
    if hidden.dim() != 2 or weight.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden [N, H], weight [V, H], labels [N]; got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(labels.shape)}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    return _ChunkedCrossEntropy.apply(hidden, weight, labels, int(chunk_tokens), ignore_index)


def _plain_head(model) -> nn.Linear | None:
    """The lm_head when it is a bias-free nn.Linear that the model applies as is (no logit scaling or
    soft-capping in its config), else None."""
    head = model.get_output_embeddings()
    cfg = model.config
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1.0) \
            or getattr(cfg, "logits_scaling", None) not in (None, 1.0):
        return None
    return head


def causal_lm_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                   chunk_tokens: int | None = None) -> torch.Tensor:
    """``model(input_ids=..., attention_mask=..., labels=...).loss`` of a transformers *ForCausalLM
    (labels [B, T], -100 where not scored; position t predicts label t + 1), with the decoder run as
    the model runs it (gradient checkpointing included) and the lm_head and cross-entropy by
    chunked_cross_entropy; ``chunk_tokens`` None: chunk_tokens(vocab). A model whose lm_head is not a
    bias-free nn.Linear applied as is (logit scaling or soft-capping) gets model(...).loss itself."""
    head = _plain_head(model)
    if head is None:
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out.last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])
    # position t predicts label t + 1, the last position nothing: ForCausalLMLoss's layout
    target = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1).to(hidden.device)
    size = chunk_tokens if chunk_tokens is not None else _default_chunk(head.weight.shape[0])
    return chunked_cross_entropy(hidden, head.weight, target, size)
