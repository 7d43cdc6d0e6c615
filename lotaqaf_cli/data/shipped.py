"""Offline data shipped with lotaqaf for the embedded model: calibration windows, held-out windows
and the self-distilled training set, generated once by scripts/make_shipped_data.py (one CPU
thread, fixed seeds) and committed under lotaqaf_cli/data/shipped/.

Why: sampled text depends on the machine's thread count (the 16-bit held-out perplexity was 6.011
on one machine, 6.074 on another) and takes ~9 minutes to generate on 2 cores. With `source:
shipped` every machine reads the same token ids. The header of each file records the generating
command, the model's content hash, the settings and the library versions; the payload's sha256 is
checked on every read, and the model hash against the model actually loaded.

File layout (JSON): {"header": {...}, "windows": [[ids]...]} for calib/heldout,
{"header": {...}, "records": [{"messages": [...]}, ...]} for train.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from pathlib import Path

import torch

from ..errors import LotaqafError

FORMAT = "lotaqaf-shipped-data/1"
DIR = Path(__file__).parent / "shipped"
MODELS = {"embedded:smollm2": "smollm2"}   # model path -> file stem
ROLES = ("calib", "heldout", "train")
SECTION = {"calib": "calib", "heldout": "ppl", "train": "data"}  # the config section each role feeds


def path_for(model_path: str, role: str) -> Path:
    if model_path not in MODELS:
        raise LotaqafError(f"{SECTION[role]}.source=shipped: lotaqaf ships data only for "
                           f"{', '.join(MODELS)} (model is {model_path}); use "
                           + ("data=self_distill" if role == "train" else f"{SECTION[role]}.source=self"))
    return DIR / f"{MODELS[model_path]}-{role}.json"


def payload_sha256(payload) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode()).hexdigest()


def dumps(header: dict, key: str, payload) -> str:
    """The file text: the header (with the payload's sha256) pretty-printed, the payload compact."""
    header = {**header, "format": FORMAT, "payload_sha256": payload_sha256(payload)}
    rows = ",\n".join(json.dumps(r, separators=(",", ":")) for r in payload)
    return f'{{"header": {json.dumps(header, indent=1, sort_keys=True)},\n"{key}": [\n{rows}\n]}}\n'


@functools.lru_cache(maxsize=8)
def _load(path: Path, key: str) -> tuple[dict, list]:
    """(header, payload) of one file, its format and payload hash checked: parsed and hashed once per
    process (the config check and the stages read the same files). Callers must not modify them."""
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise LotaqafError(f"shipped data file {path} is missing (reinstall lotaqaf)") from None
    except json.JSONDecodeError as e:
        raise LotaqafError(f"shipped data file {path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    header, payload = obj["header"], obj[key]
    if header.get("format") != FORMAT:
        raise LotaqafError(f"{path}: format {header.get('format')!r}, expected {FORMAT}")
    if payload_sha256(payload) != header["payload_sha256"]:
        raise LotaqafError(f"{path}: payload does not match its sha256 (the file was modified)")
    return header, payload


def read(model_path: str, role: str, source_hash: str | None = None) -> tuple[dict, list]:
    """(header, payload) of a shipped file, checked: format, payload hash, and (when given) the
    content hash of the model that will use it."""
    path = path_for(model_path, role)
    header, payload = _load(path, "windows" if role != "train" else "records")
    if source_hash is not None and header["model_hash"] != source_hash:
        raise LotaqafError(f"{path} was generated from a model with hash {header['model_hash'][:19]}..., "
                           f"not {source_hash[:19]}... (the loaded {model_path}); use "
                           + ("data=self_distill" if role == "train" else f"{SECTION[role]}.source=self"))
    return header, payload


def check(header: dict, role: str, n_samples: int, seed: int, seq_len: int | None = None) -> None:
    """Refuse a request the shipped file cannot answer: more windows, longer windows or more records
    than it holds, or another seed (with shipped data a different seed would silently change nothing)."""
    key = SECTION[role]
    again = "data=self_distill" if role == "train" else f"{key}.source=self"
    if seed != header["seed"]:
        raise LotaqafError(f"{key}.source=shipped was sampled with {key}.seed={header['seed']}; {key}.seed={seed} "
                           f"needs {again} (sampled anew)")
    if n_samples > header["n_samples"] or (seq_len or 0) > header.get("seq_len", 0):
        have = f"{header['n_samples']} windows x {header['seq_len']} tokens" if seq_len else \
            f"{header['n_samples']} examples"
        asks = f"{key}.n_samples={n_samples}" + (f" {key}.seq_len={seq_len}" if seq_len else "")
        raise LotaqafError(f"{key}.source=shipped has {have}; {asks} asks for more (use {again})")


def check_section(model_path: str, role: str, section) -> None:
    """The config check (before any model loads) of a section with ``source: shipped``."""
    header, _ = read(model_path, role)
    check(header, role, section.n_samples, section.seed, section.get("seq_len") if role != "train" else None)


def windows(model_path: str, role: str, source_hash: str, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """The first ``n_samples`` shipped windows of ``role`` (calib or heldout), each cut to ``seq_len``."""
    header, rows = read(model_path, role, source_hash)
    check(header, role, n_samples, seed, seq_len)
    return torch.tensor(rows, dtype=torch.long)[:n_samples, :seq_len].contiguous()


def records(model_path: str, source_hash: str, n_samples: int, seed: int) -> list[dict]:
    """The first ``n_samples`` shipped self-distilled training records (chat messages)."""
    header, recs = read(model_path, "train", source_hash)
    check(header, "train", n_samples, seed)
    return copy.deepcopy(recs[:n_samples])  # the parsed file is shared (see _load)
