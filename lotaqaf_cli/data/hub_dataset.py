"""A dataset split from the Hugging Face hub or a local .json/.jsonl/.csv/.parquet file, failing with a
one-line LotaqafError (offline: a cached copy still loads, a missing one fails in about a second)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..errors import LotaqafError


@contextlib.contextmanager
def offline_if_unreachable():
    """Put datasets / huggingface_hub in offline mode while the hub cannot be reached, so a missing
    network fails in about a second (a cached copy still loads) instead of retrying for ~25 s."""
    from ..hub import hub_reachable

    if hub_reachable():
        yield
        return
    import datasets.config as dcfg
    import huggingface_hub.constants as hcfg

    saved = dcfg.HF_HUB_OFFLINE, hcfg.HF_HUB_OFFLINE
    dcfg.HF_HUB_OFFLINE = hcfg.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        dcfg.HF_HUB_OFFLINE, hcfg.HF_HUB_OFFLINE = saved


def first_line(e: Exception, n: int = 160) -> str:
    return (str(e).splitlines()[0] if str(e) else type(e).__name__)[:n]


def load_split(path: str, config: str | None, split: str):
    """A dataset split from the hub (``path`` an id) or from a local .json/.jsonl/.csv/.parquet file."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetNotFoundError
    from datasets.utils.logging import disable_progress_bar, set_verbosity_error

    set_verbosity_error()
    disable_progress_bar()
    local = Path(path).expanduser()
    if local.is_file():
        fmt = "json" if local.suffix in (".json", ".jsonl") else local.suffix.lstrip(".")
        try:
            return load_dataset(fmt, data_files=str(local), split=split)
        except Exception as e:  # unknown format, malformed file
            raise LotaqafError(f"cannot read dataset file {path}: {first_line(e, 200)}") from None
    try:
        with offline_if_unreachable():
            return load_dataset(path, config, split=split)
    except DatasetNotFoundError as e:  # reachable, but no such (or a gated) dataset
        raise LotaqafError(f"dataset '{path}' was not found on the Hugging Face hub or is gated "
                           f"({first_line(e)})") from None
    except (ConnectionError, OSError) as e:  # offline, no access, missing cache
        raise LotaqafError(f"cannot fetch dataset '{path}': the Hugging Face hub is unreachable "
                           f"({first_line(e)}); offline use data=self_distill or data=jsonl") from None
    except Exception as e:  # datasets raises many types for a bad config or split
        raise LotaqafError(f"cannot load dataset '{path}': {first_line(e, 200)}") from None
