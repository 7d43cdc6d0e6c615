"""Fast multiple-choice scoring with a shared-prefix key/value cache.

lm-eval scores a multiple-choice question by the log-likelihood of each continuation (" A",
" B", ...) after the context and predicts the argmax. For MMLU k-shot, the context of every
question of a subject starts with the same description and the same k solved examples, so that
part is run through the model once per subject; its key/value cache is then reused for every
question, which needs only its own tokens run. With single-token continuations (the usual case:
" A" is one token) one forward of the question gives the log-probabilities of all the letters.

Tokenization follows lm-eval's ``HFLM`` exactly (``_encode_pair``): trailing spaces of the context
move to the continuation, context+continuation is encoded as one string and the continuation is
what follows the separately encoded context; ``tokenizer.encode`` keeps its default special tokens
unless ``add_bos`` says otherwise (HFLM's ``add_bos_token``), and a string that already starts
with the prefix (BOS/EOS) token's text is encoded without them. Over-long inputs are cut from the
left to ``max_length`` (lm-eval's rule, model config's length first) and run without the cache.
The shared prefix is the longest common prefix of the questions' token ids, so a tokenizer that
merges across the few-shot/question boundary cannot make the cache wrong.

Pure computation: no files, no printing.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

DEFAULT_MAX_LENGTH = 2048                      # lm-eval's fallback
_TOKENIZER_INFINITY = 1000000000000000019884624838656
_LENGTH_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx")


# --------------------------------------------------------------------------- lm-eval's tokenization


def model_max_length(model, tokenizer=None, default: int = DEFAULT_MAX_LENGTH) -> int:
    """The context length lm-eval's HFLM uses when none is given: the (text) config's
    n_positions / max_position_embeddings / n_ctx, else the tokenizer's model_max_length."""
    config = getattr(model, "config", None)
    cfg = getattr(config, "text_config", None) or config
    for attr in _LENGTH_ATTRS:
        value = getattr(cfg, attr, None)
        if value is not None:
            return int(value)
    mml = getattr(tokenizer, "model_max_length", None)
    if mml is not None and mml != _TOKENIZER_INFINITY:
        return int(mml)
    return default


def prefix_token_id(tokenizer) -> int | None:
    """The token lm-eval puts before an empty context: BOS, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def tok_encode(tokenizer, string: str, add_bos: bool | None = None) -> list[int]:
    """``HFLM.tok_encode(string)``: the tokenizer's own default for special tokens unless
    ``add_bos`` is set; none when the string already starts with the prefix token's text."""
    kwargs = {} if add_bos is None else {"add_special_tokens": add_bos}
    pid = prefix_token_id(tokenizer)
    if pid is not None and string.startswith(tokenizer.decode(pid)):
        kwargs["add_special_tokens"] = False
    return list(tokenizer.encode(string, **kwargs))


def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool | None = None
                ) -> tuple[list[int], list[int]]:
    """``HFLM._encode_pair`` for a causal model (context must be non-empty)."""
    if not context:
        raise ValueError("empty context")
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok_encode(tokenizer, context + continuation, add_bos)
    ctx = tok_encode(tokenizer, context, add_bos)
    return ctx, whole[len(ctx):]


# --------------------------------------------------------------------------- scoring


@dataclass
class SubjectScores:
    logprobs: torch.Tensor        # [n_questions, n_choices] float64: sum of continuation log-probs
    predictions: list[int]        # argmax per question (first on ties, as numpy's argmax)
    prefix_tokens: int            # tokens in the shared cached prefix (0: no cache used)
    tokens_run: int               # tokens run through the model in total (prefix counted once)
    truncated: int = 0            # questions cut to max_length (scored without the cache)
    stats: dict = field(default_factory=dict)


@dataclass
class _Row:
    ids: list[int]                # model input (context + continuation[:-1], left-cut to max_length)
    truncated: bool


def _cache_kwarg(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _common_prefix_len(seqs: list[list[int]]) -> int:
    if not seqs:
        return 0
    first, n = seqs[0], min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


@torch.no_grad()
def score_subject(model, tokenizer, fewshot_prefix_text: str, questions: Sequence[str],
                  choices: Sequence[str] = (" A", " B", " C", " D"), *, batch_size: int = 8,
                  max_length: int | None = None, add_bos: bool | None = None, use_cache: bool = True,
                  progress: Callable[[int], None] | None = None) -> SubjectScores:
    """Score ``len(questions)`` multiple-choice questions that share ``fewshot_prefix_text``.

    The context of question i is ``fewshot_prefix_text + questions[i]``; the scores are the summed
    log-probabilities of each of ``choices`` after it, tokenized as lm-eval's HFLM does, and the
    prediction is their argmax (lm-eval's ``acc``). ``max_length`` defaults to lm-eval's choice
    for the model; ``use_cache=False`` runs every input in full (a reference for tests).
    ``progress(n)`` is called after each batch with the number of inputs done.
    """
    if not questions:
        return SubjectScores(torch.zeros(0, len(choices), dtype=torch.float64), [], 0, 0)
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    max_length = max_length or model_max_length(model, tokenizer)

    # 1. token ids exactly as lm-eval builds them; dedupe identical inputs (lm-eval's one-token
    #    continuation cache does the same: all letters share the question's context)
    rows: list[_Row] = []
    row_of: dict[tuple[int, ...], int] = {}
    targets: list[list[tuple[int, list[int]]]] = []   # per question, per choice: (row, cont ids)
    for q in questions:
        per_choice = []
        for ch in choices:
            ctx, cont = encode_pair(tokenizer, fewshot_prefix_text + q, ch, add_bos)
            if not cont or len(cont) > max_length:
                raise ValueError(f"continuation {ch!r} encodes to {len(cont)} tokens (max_length {max_length})")
            full = ctx + cont
            truncated = len(full) > max_length + 1
            ids = full[-(max_length + 1):][:-1]
            key = tuple(ids)
            if key not in row_of:
                row_of[key] = len(rows)
                rows.append(_Row(ids, truncated))
            per_choice.append((row_of[key], cont))
        targets.append(per_choice)

    need: dict[int, int] = {}                        # row -> how many trailing positions are scored
    users: dict[int, list[tuple[int, int, list[int]]]] = {}   # row -> (question, choice, cont ids)
    for qi, per_choice in enumerate(targets):
        for ci, (r, cont) in enumerate(per_choice):
            need[r] = max(need.get(r, 0), len(cont))
            users.setdefault(r, []).append((qi, ci, cont))

    # 2. the shared prefix: common to every cached row and ending before any scored position
    cached = [i for i, r in enumerate(rows) if use_cache and not r.truncated]
    plen = 0
    if cached:
        plen = min(_common_prefix_len([rows[i].ids for i in cached]),
                   min(len(rows[i].ids) - need[i] for i in cached))
    if plen <= 0:
        plen = 0
        cached = []
    in_cache = set(cached)
    uncached = [i for i in range(len(rows)) if i not in in_cache]

    device = next(model.parameters()).device
    kw = _cache_kwarg(model)
    keep_ok = "logits_to_keep" in inspect.signature(model.forward).parameters
    was_training = model.training
    model.eval()
    scores = torch.empty(len(questions), len(choices), dtype=torch.float64)
    tokens_run = 0
    try:
        prefix_cache = None
        if cached:
            from transformers import DynamicCache

            prefix_cache = DynamicCache()
            model(input_ids=torch.tensor([rows[cached[0]].ids[:plen]], device=device),
                  use_cache=True, **{kw: prefix_cache})
            tokens_run += plen

        def run(batch: list[int], offset: int, cache) -> None:
            nonlocal tokens_run
            seqs = [rows[i].ids[offset:] for i in batch]
            width = max(len(s) for s in seqs)
            inp = torch.tensor([s + [s[-1]] * (width - len(s)) for s in seqs], device=device)  # right pad
            tokens_run += sum(len(s) for s in seqs)
            # positions whose logits are scored: the last need[i] real positions of each row
            wanted = sorted({len(s) - 1 - k for s, i in zip(seqs, batch, strict=True) for k in range(need[i])})
            kwargs = {}
            if cache is not None:
                c = copy.deepcopy(cache)
                if len(batch) > 1:
                    c.batch_repeat_interleave(len(batch))
                kwargs = {kw: c, "use_cache": True}
            if keep_ok:
                kwargs["logits_to_keep"] = torch.tensor(wanted, device=device)
                logits = model(input_ids=inp, **kwargs).logits
                col = {p: j for j, p in enumerate(wanted)}
            else:
                logits = model(input_ids=inp, **kwargs).logits
                col = {p: p for p in wanted}
            for b, (s, i) in enumerate(zip(seqs, batch, strict=True)):
                cols = [col[len(s) - need[i] + k] for k in range(need[i])]
                logprobs = F.log_softmax(logits[b, cols], dim=-1)     # [need, vocab], model dtype
                for qi, ci, cont in users[i]:
                    lp = logprobs[-len(cont):].gather(1, torch.tensor(cont, device=device).unsqueeze(1))
                    scores[qi, ci] = float(lp.sum())                # summed in the model dtype, as lm-eval

        done = 0
        for group, offset, cache in ((cached, plen, prefix_cache), (uncached, 0, None)):
            order = sorted(group, key=lambda i: -len(rows[i].ids))   # similar lengths together
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                run(batch, offset, cache)
                done += len(batch)
                if progress is not None:
                    progress(done)
    finally:
        model.train(was_training)

    # 3. predictions: lm-eval's acc is the argmax of the continuation log-likelihoods
    predictions = [int(torch.argmax(scores[qi])) for qi in range(len(questions))]
    n_trunc = sum(1 for per_choice in targets if any(rows[r].truncated for r, _ in per_choice))
    return SubjectScores(scores, predictions, plen, tokens_run, n_trunc,
                         {"rows": len(rows), "cached_rows": len(cached)})
