"""What the stages share: the in-memory context of a chained run, device choice, cached text."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig

from .. import ui
from ..errors import LotaqafError
from ..io.models import LoadedModel, load_model
from ..io.rundir import RunDir, cache_key

TEXT_VERSION = "selfgen-v1"  # bump when the prompt bank or sampling changes


@dataclass
class Context:
    """Objects handed from one stage to the next within one `lotaqaf train` invocation."""

    cfg: DictConfig
    run: RunDir
    source: LoadedModel | None = None
    quantized: torch.nn.Module | None = None
    quantized_dir: str | None = None
    quantized_hash: str | None = None
    adapted: torch.nn.Module | None = None
    timings: dict = field(default_factory=dict)


def pick_device(cfg: DictConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise LotaqafError("device=cuda but no CUDA device is available (use device=cpu or device=auto)")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def load_source(ctx: Context) -> LoadedModel:
    if ctx.source is None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF converter's own bars; we show a spinner
        t0 = time.time()
        with ui.status(f"loading {ctx.cfg.model.path} ..."):
            ctx.source = load_model(ctx.cfg.model.path, ctx.cfg.model.dtype)
        ctx.source.model.to(pick_device(ctx.cfg))
        ctx.timings["load_s"] = round(time.time() - t0, 1)
        ui.say(f"loaded {ctx.cfg.model.path} ({ctx.source.kind}) in {ctx.timings['load_s']} s")
    return ctx.source


def text_windows(ctx: Context, role: str, section: DictConfig) -> tuple[torch.Tensor, str]:
    """Token windows [n, seq_len] for calibration ("calib") or held-out perplexity ("heldout").

    Returns (windows, sha256 of the windows). Self-generated text is cached by content.
    """
    from safetensors.torch import load_file, save_file

    from ..data import selfgen, textfile

    src = load_source(ctx)
    if section.source == "self":
        key = cache_key(TEXT_VERSION, src.source_hash, role, section.n_samples, section.seq_len, section.seed)
        path = ctx.run.cache_path("text", key, ".safetensors")
        if path.is_file():
            windows = load_file(str(path))["input_ids"]
            ui.say(f"{role} text: reusing {section.n_samples} x {section.seq_len} self-generated tokens ({path})")
        else:
            need = section.n_samples * section.seq_len
            with ui.progress_bar(f"sampling {role} text from the 16-bit model", None) as advance:
                windows = selfgen.self_text_windows(src.model, src.tokenizer, role, section.n_samples,
                                                    section.seq_len, section.seed, progress=advance)
            tmp = path.with_name(path.name + ".tmp")
            save_file({"input_ids": windows.contiguous()}, str(tmp))
            tmp.replace(path)
            ui.say(f"{role} text: sampled {need} tokens, cached at {path}")
    elif section.source == "file":
        if src.tokenizer is None:
            raise LotaqafError(f"{role} text from a file needs a model with a tokenizer")
        windows = textfile.file_windows(section.path, src.tokenizer, section.n_samples, section.seq_len,
                                        section.seed)
    else:  # c4
        if src.tokenizer is None:
            raise LotaqafError("C4 calibration needs a model with a tokenizer")
        windows = textfile.c4_windows(src.tokenizer, section.n_samples, section.seq_len, section.seed)
    digest = "sha256:" + hashlib.sha256(windows.numpy().tobytes()).hexdigest()
    return windows, digest
