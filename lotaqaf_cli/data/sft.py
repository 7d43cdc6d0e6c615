"""Supervised fine-tuning data for the train stage.

Records come in two shapes: ``{"messages": [{role, content}, ...]}`` (the last message is the
assistant target) or Alpaca style ``{"instruction", "input", "output"}``; :func:`to_messages`
normalizes both. For the tokenizer-less ``smoke`` model, self-distillation returns raw token ids
``{"prompt_ids": [...], "answer_ids": [...]}`` instead.

An example is ``{"input_ids", "labels"}`` with the prompt positions masked (-100) in ``labels``, the
prompt cut to its LAST ``source_len`` tokens and the target to its FIRST ``target_len`` tokens (the
paper's recovery setting: source 1024, target 256, chat template, prompt masked).

Sources: ``self_distill`` (offline default: the 16-bit model answers the "train" prompts of the
bank in :mod:`selfgen`, disjoint from calibration and held-out prompts), ``shipped`` (those answers
generated once for the embedded model, :mod:`shipped`), ``alpaca`` (Hugging Face hub), the tasks
of :mod:`tasks` (``gsm8k`` and ``viggo`` from the hub or a local file in their layout, ``sql`` from
HALO's JSONL, a local file), and ``jsonl`` (a local file). MMLU is the evaluation benchmark and is refused as
training data. Nothing here prints; only the loaders touch files or the network.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..errors import LotaqafError
from . import tasks
from .hub_dataset import load_split

IGNORE_INDEX = -100
SOURCES = ("self_distill", "shipped", "alpaca", "gsm8k", "viggo", "sql", "jsonl")
HUB_DEFAULTS = {"alpaca": "yahma/alpaca-cleaned"}


# --------------------------------------------------------------------------- records


def to_messages(record: dict) -> list[dict]:
    """Normalize a ``messages`` or Alpaca-style record to a list of ``{role, content}`` dicts.

    The last message is the assistant target; raises :class:`LotaqafError` on any other shape.
    """
    if not isinstance(record, dict):
        raise LotaqafError(f"a record must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2:
            raise LotaqafError("\"messages\" must be a list of at least 2 {role, content} objects")
        out = []
        for m in msgs:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise LotaqafError("each message needs string \"role\" and \"content\" fields")
            out.append({"role": m["role"], "content": m["content"]})
        if out[-1]["role"] != "assistant":
            raise LotaqafError(f"the last message must be the assistant's answer (got role '{out[-1]['role']}')")
        if not out[-1]["content"].strip():
            raise LotaqafError("the assistant answer (last message) is empty")
        return out
    if "instruction" in record and "output" in record:
        instruction, inp, output = record["instruction"], record.get("input") or "", record["output"]
        if not all(isinstance(x, str) for x in (instruction, inp, output)):
            raise LotaqafError("\"instruction\", \"input\" and \"output\" must be strings")
        prompt = "\n\n".join(x for x in (instruction.strip(), inp.strip()) if x)
        if not prompt:
            raise LotaqafError("the record has an empty \"instruction\" and \"input\"")
        if not output.strip():
            raise LotaqafError("the record has an empty \"output\"")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    keys = ", ".join(sorted(map(str, record))) or "none"
    raise LotaqafError(f"a record needs \"messages\" or \"instruction\"/\"input\"/\"output\" (has: {keys})")


# --------------------------------------------------------------------------- tokenization


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _assemble(prompt_ids: list[int], target_ids: list[int], source_len: int, target_len: int) -> dict:
    if source_len < 0 or target_len < 1:
        raise ValueError(f"need source_len >= 0 and target_len >= 1 (got {source_len}, {target_len})")
    prompt = list(prompt_ids)[-source_len:] if source_len > 0 else []
    target = list(target_ids)[:target_len]
    return {"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target}


def _ids(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _chat_text(tokenizer, turns: list[dict], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja2 TemplateError and friends (e.g. a role the template refuses)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LotaqafError(f"the chat template cannot render this conversation: {first[:200]}") from None


def _plain_prompt(turns: list[dict]) -> str:
    """The prompt of a tokenizer without a chat template: the non-empty turns, a blank line apart."""
    return "\n\n".join(m["content"] for m in turns if m["content"]) + "\n"


def prompt_ids(tokenizer, turns: list[dict]) -> list[int]:
    """The token ids of the turns before an answer, as :func:`split_prompt_target` renders them: with the
    chat template and its generation prompt, tokenized without adding special tokens; without one, the
    plain prompt with the tokenizer's usual special tokens (what evaluation feeds the model)."""
    if getattr(tokenizer, "chat_template", None):
        return _ids(tokenizer, _chat_text(tokenizer, turns, True), add_special_tokens=False)
    return _ids(tokenizer, _plain_prompt(turns), add_special_tokens=True)


def split_prompt_target(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(prompt ids, target ids) of a conversation, untruncated; their concatenation is the token
    sequence of the whole conversation.

    With a chat template: the full conversation is rendered and tokenized exactly as
    ``apply_chat_template(messages, tokenize=True)`` does, and split after the longest prefix it
    shares with the rendering of ``messages[:-1]`` plus the generation prompt, so the target is the
    assistant content and the end-of-turn token(s) as the template writes them. Without one:
    the non-empty turns a blank line apart and ``"\\n"`` (with the tokenizer's usual special tokens),
    then ``answer + eos``.
    """
    if not messages or messages[-1].get("role") != "assistant":
        raise LotaqafError("the last message must be the assistant's answer")
    if getattr(tokenizer, "chat_template", None):
        full = _ids(tokenizer, _chat_text(tokenizer, messages, False), add_special_tokens=False)
        prompt = prompt_ids(tokenizer, messages[:-1])
        cut = _common_prefix(full, prompt)
        if cut == len(full):
            raise LotaqafError("the chat template renders no tokens for the assistant answer")
        return full[:cut], full[cut:]
    prompt_text = _plain_prompt(messages[:-1])
    answer = messages[-1]["content"]
    full = _ids(tokenizer, prompt_text + answer, add_special_tokens=True)
    prompt = _ids(tokenizer, prompt_text, add_special_tokens=True)
    cut = _common_prefix(full, prompt)
    eos = getattr(tokenizer, "eos_token_id", None)
    target = full[cut:] + ([eos] if eos is not None else [])
    return full[:cut], target


def tokenize_example(tokenizer, messages: list[dict], source_len: int, target_len: int) -> dict:
    """``{"input_ids", "labels"}`` for one conversation: prompt (last ``source_len`` tokens, labels
    -100) followed by the target (first ``target_len`` tokens, labels = ids)."""
    prompt, target = split_prompt_target(tokenizer, messages)
    return _assemble(prompt, target, source_len, target_len)


def tokenize_ids(prompt_ids: list[int], answer_ids: list[int], source_len: int, target_len: int) -> dict:
    """The same masked layout as :func:`tokenize_example` for raw token ids (no tokenizer)."""
    if not answer_ids:
        raise LotaqafError("a raw-id record has no answer tokens")
    return _assemble(prompt_ids, answer_ids, source_len, target_len)


def tokenize_record(tokenizer, record: dict, source_len: int, target_len: int) -> dict:
    """Tokenize one record of any supported shape (raw ids, ``messages`` or Alpaca)."""
    if "prompt_ids" in record and "answer_ids" in record:
        return tokenize_ids(record["prompt_ids"], record["answer_ids"], source_len, target_len)
    if tokenizer is None:
        raise LotaqafError("text records need a model with a tokenizer (the smoke model has none)")
    return tokenize_example(tokenizer, to_messages(record), source_len, target_len)


def tokenize_records(tokenizer, records: list[dict], source_len: int, target_len: int) -> list[dict]:
    return [tokenize_record(tokenizer, r, source_len, target_len) for r in records]


def pad_token_id(tokenizer) -> int:
    """Padding id: the tokenizer's pad, else its eos, else 0 (padded positions are masked anyway)."""
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None) if tokenizer is not None else None
        if isinstance(v, int):
            return v
    return 0


# --------------------------------------------------------------------------- sources


def _refuse_mmlu(name: str) -> None:
    if "mmlu" in str(name).lower():
        raise LotaqafError(f"'{name}' looks like MMLU, the evaluation benchmark; it is never used for training")


def _sample(items: list, n_samples: int | None, seed: int) -> list:
    if n_samples is None:
        return items
    if n_samples < 1:
        raise LotaqafError(f"data n_samples must be >= 1 (got {n_samples})")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(items), generator=g)[:n_samples].tolist()
    return [items[i] for i in idx]


def load_jsonl(path: str) -> list[dict]:
    """Records of a JSONL file, one per non-blank line, normalized to ``{"messages": [...]}``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise LotaqafError(f"training data file does not exist: {path}")
    records = []
    with open(p, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:  # without the line break, so that an error at the end of the line is placed on it
                obj = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise LotaqafError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.pos + 1})") from None
            try:
                records.append({"messages": to_messages(obj)})
            except LotaqafError as e:
                raise LotaqafError(f"{path}:{lineno}: {e}") from None
    if not records:
        raise LotaqafError(f"training data file {path} holds no records")
    return records


def _rows_to_records(ds, prompt_key: str, answer_key: str, input_key: str | None) -> list[dict]:
    missing = [k for k in (prompt_key, answer_key) if k not in ds.column_names]
    if missing:
        raise LotaqafError(f"dataset has no column(s) {missing} (columns: {ds.column_names})")
    prompts, answers = ds[prompt_key], ds[answer_key]
    inputs = ds[input_key] if input_key and input_key in ds.column_names else [""] * len(prompts)
    records = []
    for q, i, a in zip(prompts, inputs, answers, strict=True):
        try:  # skip rows with an empty instruction or output
            records.append({"messages": to_messages({"instruction": q or "", "input": i or "", "output": a or ""})})
        except LotaqafError:
            continue
    return records


def load_records(source: str, path: str | None = None, n_samples: int | None = None, seed: int = 0) -> list[dict]:
    """Training records (``{"messages": [...]}``) from ``alpaca`` (hub id or local file in ``path``;
    default yahma/alpaca-cleaned), a task of :mod:`tasks` (its train split, or a local file in its
    layout) or ``jsonl``.

    With ``n_samples`` set, a seeded random subset of that size (all records, shuffled, when there
    are fewer). ``self_distill`` needs the model: use :func:`self_distill_records`.
    """
    if source in ("self_distill", "shipped"):
        raise LotaqafError(f"data={source} needs the model (self_distill_records, data.shipped.records)")
    if source not in SOURCES:
        raise LotaqafError(f"unknown training data source '{source}' (choose from {', '.join(SOURCES)})")
    if source == "jsonl":
        if not path:
            raise LotaqafError("data=jsonl needs a path to a .jsonl file")
        _refuse_mmlu(Path(path).name)
        return _sample(load_jsonl(path), n_samples, seed)
    if source in tasks.TASKS:  # the task's train split from the hub, or a local file in its layout
        t = tasks.task(source)
        _refuse_mmlu(path or "")
        return _sample([tasks.record(t, r) for r in tasks.rows(t, path, t.train_split)], n_samples, seed)
    path = path or HUB_DEFAULTS[source]
    _refuse_mmlu(path)
    records = _rows_to_records(load_split(path, None, "train"), "instruction", "output", "input")
    if not records:
        raise LotaqafError(f"dataset '{path}' yielded no usable records")
    return _sample(records, n_samples, seed)


def self_distill_records(model, tokenizer, n_samples: int, max_new_tokens: int, seed: int,
                         progress=None) -> list[dict]:
    """``n_samples`` records answered by ``model`` itself (sampled) for the bank's "train" prompts.

    With a tokenizer: ``{"messages": [user prompt, assistant answer]}`` (answer decoded without
    special tokens, trailing eos dropped, stripped; empty answers are re-drawn). Without one (smoke
    model): ``{"prompt_ids", "answer_ids"}`` with the ids as generated (eos kept as the end of turn).
    ``progress(n)`` is called as prompts are answered.
    """
    from .selfgen import prompts_for, sample_answers

    if n_samples < 1:
        raise LotaqafError(f"data n_samples must be >= 1 (got {n_samples})")
    if tokenizer is None:
        pairs = sample_answers(model, None, "train", n_samples, max_new_tokens, seed, progress=progress)
        return [{"prompt_ids": list(p), "answer_ids": list(a)} for p, a in pairs]
    eos = tokenizer.eos_token_id
    records: list[dict] = []
    for round_ in range(4):
        need = n_samples - len(records)
        if need <= 0:
            break
        round_seed = seed + 7919 * round_
        bank = prompts_for("train", round_seed)
        # sample_answers answers bank[i % len(bank)] for i in range(need), in order
        pairs = sample_answers(model, tokenizer, "train", need, max_new_tokens, round_seed, progress=progress)
        for i, (_, ans) in enumerate(pairs):
            if eos is not None and ans and ans[-1] == eos:
                ans = ans[:-1]
            text = tokenizer.decode(ans, skip_special_tokens=True).strip()
            if text:
                records.append({"messages": [{"role": "user", "content": bank[i % len(bank)]},
                                             {"role": "assistant", "content": text}]})
    if len(records) < n_samples:
        raise LotaqafError(f"self-distillation produced only {len(records)} non-empty answers of {n_samples}")
    return records[:n_samples]


# --------------------------------------------------------------------------- batches


class SFTBatches:
    """Deterministic, resumable batches of tokenized examples.

    The examples are read as an endless stream: epoch ``e`` is a permutation seeded by
    ``(seed, e)``, and epochs follow each other seamlessly (a batch may straddle two). Batch ``k``
    is stream items ``[k*B, (k+1)*B)``, so :meth:`batch_at` is stateless and a run restored with
    :meth:`load_state_dict` sees exactly the batches an uninterrupted run would have seen.
    Tensors are right-padded to the longest example of the batch: ``input_ids`` (pad ``pad_id``),
    ``attention_mask`` (0 on padding) and ``labels`` (-100 on padding).
    """

    def __init__(self, examples: list[dict], batch_size: int, seed: int = 0, pad_id: int = 0):
        if not examples:
            raise LotaqafError("no training examples")
        if batch_size < 1:
            raise LotaqafError(f"batch size must be >= 1 (got {batch_size})")
        for ex in examples:
            if len(ex["input_ids"]) != len(ex["labels"]) or not ex["input_ids"]:
                raise ValueError("each example needs non-empty input_ids and labels of equal length")
        self.examples = examples
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.pad_id = int(pad_id)
        self.epoch = 0      # epoch of the next stream item
        self.position = 0   # index of the next item within that epoch's permutation
        self._perms: dict[int, list[int]] = {}
        self._fingerprint: str | None = None

    @property
    def n_examples(self) -> int:
        return len(self.examples)

    @property
    def step(self) -> int:
        """Batches consumed so far."""
        return (self.epoch * self.n_examples + self.position) // self.batch_size

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            digest = hashlib.sha256(f"sft:{self.seed}:{epoch}".encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
            self._perms[epoch] = torch.randperm(self.n_examples, generator=g).tolist()
        return self._perms[epoch]

    def indices_at(self, step: int) -> list[int]:
        """Example indices of batch ``step`` (0-based)."""
        if step < 0:
            raise ValueError(step)
        n, out = self.n_examples, []
        for pos in range(step * self.batch_size, (step + 1) * self.batch_size):
            out.append(self._perm(pos // n)[pos % n])
        return out

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        exs = [self.examples[i] for i in indices]
        width = max(len(e["input_ids"]) for e in exs)
        ids = torch.full((len(exs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(exs), width), dtype=torch.long)
        labels = torch.full((len(exs), width), IGNORE_INDEX, dtype=torch.long)
        for r, e in enumerate(exs):
            L = len(e["input_ids"])
            ids[r, :L] = torch.tensor(e["input_ids"], dtype=torch.long)
            mask[r, :L] = 1
            labels[r, :L] = torch.tensor(e["labels"], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def batch_at(self, step: int) -> dict[str, torch.Tensor]:
        return self.collate(self.indices_at(step))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        start, n = self.epoch * self.n_examples + self.position, self.n_examples
        batch = self.collate([self._perm(p // n)[p % n] for p in range(start, start + self.batch_size)])
        self._advance(self.batch_size)
        return batch

    def _advance(self, k: int) -> None:
        pos = self.epoch * self.n_examples + self.position + k
        self.epoch, self.position = divmod(pos, self.n_examples)

    def fingerprint(self) -> str:
        """A hash of the tokenized examples (guards a resume against changed data)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for e in self.examples:
                h.update(json.dumps([e["input_ids"], e["labels"]], separators=(",", ":")).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "step": self.step, "seed": self.seed,
                "batch_size": self.batch_size, "n_examples": self.n_examples, "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "batch_size", "n_examples", "fingerprint"):
            mine = self.fingerprint() if key == "fingerprint" else getattr(self, key)
            if key in state and state[key] != mine:
                raise LotaqafError(f"cannot resume the training data: {key} was {state[key]}, is now {mine} "
                                   "(the data or batch settings changed since the checkpoint)")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.n_examples:
            raise LotaqafError(f"corrupt data state: epoch {epoch}, position {position}")
        self.epoch, self.position = epoch, position
