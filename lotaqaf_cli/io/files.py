"""File helpers every stage uses: atomic writes (a temporary name, then a rename), sha256 of files,
and the manifest that lets a directory detect a truncated or modified file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import LotaqafError

MANIFEST = "lotaqaf_manifest.json"


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike):
    """Yield a temporary sibling path; rename it to ``final`` only if the block succeeds (else, e.g.
    on a full disk, remove it)."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    except OSError as e:  # name the artifact, not its temporary name
        if e.filename is not None and str(e.filename) == str(tmp):
            raise OSError(e.errno, e.strerror, str(final)) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike):
    """Yield a temporary sibling directory; rename it to ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(directory: Path) -> None:
    """sha256 of every file of ``directory`` into its manifest (call last, after every file)."""
    manifest = {f.name: file_sha256(f) for f in sorted(directory.iterdir()) if f.is_file() and f.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def verify_manifest(directory: Path) -> None:
    """Every file the manifest names is present with its recorded sha256 (no manifest: nothing to check,
    e.g. a checkpoint another tool wrote)."""
    mf = directory / MANIFEST
    if not mf.is_file():
        return
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError:
        raise LotaqafError(f"{mf} is corrupted (not JSON)") from None
    for name, digest in manifest.items():
        f = directory / name
        if not f.is_file():
            raise LotaqafError(f"checkpoint {directory} is incomplete: {name} is missing")
        if file_sha256(f) != digest:
            raise LotaqafError(f"checkpoint {directory} is corrupted: {name} does not match its recorded sha256 "
                               "(truncated or modified)")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise LotaqafError(f"cannot read {path}: corrupted or truncated safetensors file ({str(e)[:120]})") from None
