"""Calibration text from a local file or from C4 on the hub, cut into token windows."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import LotaqafError


def _windows_from_docs(docs: list[str], tokenizer, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Random ``seq_len`` windows from documents long enough; short documents are concatenated."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for d in docs:
        stream.extend(tokenizer(d)["input_ids"])
        if eos is not None:
            stream.append(eos)
    if len(stream) < seq_len + 1:
        raise LotaqafError(f"calibration text has {len(stream)} tokens; need at least {seq_len + 1}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq_len, (n_samples,), generator=g).tolist()
    data = torch.tensor(stream, dtype=torch.long)
    return torch.stack([data[s:s + seq_len] for s in starts])


def file_windows(path: str, tokenizer, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    p = Path(path).expanduser()
    if not p.is_file():
        raise LotaqafError(f"calibration file does not exist: {path}")
    lines = [ln for ln in p.read_text(errors="replace").splitlines() if ln.strip()]
    if p.suffix == ".jsonl":
        try:
            docs = [json.loads(ln)["text"] for ln in lines]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise LotaqafError(f"{path}: every JSONL line needs a \"text\" field") from None
    else:
        docs = lines
    return _windows_from_docs(docs, tokenizer, n_samples, seq_len, seed)


def c4_windows(tokenizer, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """The paper's calibration: windows of the first C4 (en) training shard from the hub."""
    try:
        from datasets import load_dataset

        ds = load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
    except Exception as e:  # datasets raises many types when offline
        raise LotaqafError(f"cannot fetch C4 from the hub ({type(e).__name__}); offline, use calib=self") from None
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[: n_samples * 4].tolist()
    docs = [ds[i]["text"] for i in idx]
    return _windows_from_docs(docs, tokenizer, n_samples, seq_len, seed)
