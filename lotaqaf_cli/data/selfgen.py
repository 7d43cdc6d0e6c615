"""Offline text: prompts from a fixed bank, answered by the 16-bit model itself.

Calibration, held-out perplexity and (later) self-distillation training use DISJOINT prompt
subsets (split by a stable hash of each prompt), so perplexity is never measured on text that
was used for calibration or training. No I/O here; the caller caches the token ids.
"""

from __future__ import annotations

import hashlib

import torch

SUBJECTS = [
    "photosynthesis", "the French Revolution", "black holes", "compound interest", "the water cycle",
    "machine learning", "the Roman Empire", "volcanoes", "vaccines", "the stock market", "plate tectonics",
    "the human heart", "climate change", "the printing press", "prime numbers", "electric cars",
    "honey bees", "the Silk Road", "quantum computing", "the immune system", "renewable energy",
    "ancient Egypt", "the moon landing", "coral reefs", "inflation", "DNA", "the Internet", "glaciers",
    "jazz music", "the Renaissance", "antibiotics", "supply and demand", "the solar system", "rainforests",
    "democracy", "the theory of evolution", "earthquakes", "coffee", "the Olympic Games", "chess",
    "sleep", "the ocean tides", "bridges", "the periodic table", "recycling", "the piano", "algebra",
    "the Great Wall of China", "bread baking", "migratory birds", "the industrial revolution", "gravity",
    "public libraries", "volunteering", "time management", "the human brain", "deserts", "hurricanes",
    "the telescope", "friendship",
]
TEMPLATES = [
    "Explain {s} to a curious teenager.",
    "Write a short paragraph about {s}.",
    "What are three interesting facts about {s}?",
    "Give a brief history of {s}.",
    "Why is {s} important? Answer in a few sentences.",
    "Describe {s} in simple terms.",
    "What are common misconceptions about {s}?",
    "Write a short story that involves {s}.",
    "Summarize the main ideas behind {s}.",
    "How would you teach {s} to a beginner?",
]
ROLES = ("calib", "heldout", "train")


def prompt_role(prompt: str) -> str:
    """Stable assignment of a prompt to one role: 40% calib, 20% heldout, 40% train."""
    b = int(hashlib.sha1(prompt.encode()).hexdigest(), 16) % 5
    return "calib" if b < 2 else ("heldout" if b == 2 else "train")


def prompts_for(role: str, seed: int) -> list[str]:
    if role not in ROLES:
        raise ValueError(role)
    bank = [t.format(s=s) for s in SUBJECTS for t in TEMPLATES]
    mine = [p for p in bank if prompt_role(p) == role]
    g = torch.Generator().manual_seed(seed)
    return [mine[i] for i in torch.randperm(len(mine), generator=g).tolist()]


def _encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False) for p in prompts]
    return [tokenizer(p)["input_ids"] for p in prompts]


def _token_progress(progress, width: int):
    """A stopping criterion that never stops: at every generation step it reports the tokens the
    batch has sampled so far as ``progress(0, tokens_in_batch=n)`` (a batch takes minutes on a CPU)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class TokenProgress(StoppingCriteria):
        def __call__(self, input_ids, scores, **_):
            progress(0, tokens_in_batch=(input_ids.shape[1] - width) * input_ids.shape[0])
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([TokenProgress()])


@torch.no_grad()
def sample_answers(model, tokenizer, role: str, n_prompts: int, max_new_tokens: int, seed: int,
                   batch_size: int = 32, progress=None) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) pairs: the model's own sampled answers to ``role`` prompts.

    Without a tokenizer (the smoke model) prompts are random token ids drawn with ``seed``.
    """
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    if tokenizer is None:
        g = torch.Generator().manual_seed(seed + {"calib": 0, "heldout": 1, "train": 2}[role] * 7919)
        prompt_ids = [torch.randint(3, vocab, (8,), generator=g).tolist() for _ in range(n_prompts)]
        pad_id, eos_id = 0, getattr(model.config, "eos_token_id", None)
    else:
        bank = prompts_for(role, seed)
        prompts = [bank[i % len(bank)] for i in range(n_prompts)]
        prompt_ids = _encode_prompts(tokenizer, prompts)
        eos_id = tokenizer.eos_token_id
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    out = []
    for b0 in range(0, n_prompts, batch_size):
        batch = prompt_ids[b0:b0 + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(batch):  # left padding for generation
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        torch.manual_seed(seed * 1000003 + b0)
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                             temperature=0.8, top_p=0.95, max_new_tokens=max_new_tokens,
                             pad_token_id=pad_id, eos_token_id=eos_id,
                             stopping_criteria=_token_progress(progress, width) if progress else None)
        for r, p in enumerate(batch):
            ans = gen[r, width:].tolist()
            if eos_id is not None and eos_id in ans:
                ans = ans[: ans.index(eos_id) + 1]
            out.append((p, ans))
        if progress:
            progress(len(batch))
    return out


def pack_windows(pairs: list[tuple[list[int], list[int]]], n_samples: int, seq_len: int) -> torch.Tensor:
    """Concatenate prompt+answer token streams and cut ``n_samples`` windows of ``seq_len`` tokens."""
    stream: list[int] = []
    for p, a in pairs:
        stream.extend(p)
        stream.extend(a)
    need = n_samples * seq_len
    if len(stream) < need:
        raise ValueError(f"generated {len(stream)} tokens, need {need}")
    return torch.tensor(stream[:need], dtype=torch.long).view(n_samples, seq_len)


def self_text_windows(model, tokenizer, role: str, n_samples: int, seq_len: int, seed: int,
                      progress=None) -> torch.Tensor:
    """[n_samples, seq_len] token ids of self-generated text for ``role`` (calib or heldout)."""
    pairs: list = []
    total, round_ = 0, 0
    need = n_samples * seq_len
    while total < need:
        # Answers are ~100-250 tokens; ask for enough prompts to fill the windows in one round.
        n_prompts = max(4, -(-(need - total) // max(32, seq_len * 3 // 4)))
        new = sample_answers(model, tokenizer, role, n_prompts, max_new_tokens=seq_len,
                             seed=seed + 7 * round_, progress=progress)
        pairs.extend(new)
        total = sum(len(p) + len(a) for p, a in pairs)
        round_ += 1
    return pack_windows(pairs, n_samples, seq_len)
