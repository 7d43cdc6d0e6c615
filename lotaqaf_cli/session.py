"""What one invocation holds: the source model, the quantized base, the adapted and merged models, the
text windows and the training data, each made once (or read from the run's cache) and handed from step
to step (chain.py), so a chained run loads its base at most once.

    Session(cfg, run)                  the objects; run: the io.rundir.RunDir the invocation writes
    Session.load_source(weights)       the 16-bit source (weights=False: tokenizer and hash only)
    Session.windows_for(role, section) calibration or held-out token windows and their hash
    Session.records() / examples()     training data: raw records (read before any model loads), tokenized
    Session.precision / place(model)   the resolved precision (precision.py); a model moved to the device and
                                       cast to it (in place)
    pick_device(cfg)                   the torch device the config asks for
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig

from . import dist, precision, ui
from .data import selfgen, sft, shipped
from .errors import LotaqafError
from .io.models import LoadedModel, load_model
from .io.rundir import Cache, RunDir


def pick_device(cfg: DictConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise LotaqafError("device=cuda but no CUDA device is available (use device=cpu or device=auto)")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


@dataclass
class Session:
    """The objects one invocation holds, made once and handed from stage to stage."""

    cfg: DictConfig
    run: RunDir
    source: LoadedModel | None = None
    base: torch.nn.Module | None = None      # the quantized base
    base_info: dict | None = None            # its settings, provenance and content hash
    tokenizer: object | None = None
    adapted: torch.nn.Module | None = None
    adapter_header: dict | None = None
    merged: torch.nn.Module | None = None
    windows: dict = field(default_factory=dict)   # role -> (token windows, sha256)
    stages: list = field(default_factory=list)    # the chain this session runs
    plan: dict | None = None                      # its memory plan (stages/plan.py's summary)
    timings: dict = field(default_factory=dict)
    _records: list | None = None
    _precision: precision.Precision | None = None

    def __post_init__(self):
        if self.source is not None:
            self.tokenizer = self.source.tokenizer

    @property
    def precision(self) -> precision.Precision:
        """The precision the models compute in (cfg.precision resolved on the run's device; said once, and
        written to run.log)."""
        if self._precision is None:
            self._precision = precision.resolve(self.cfg.precision, pick_device(self.cfg))
            ui.say(f"computing in {self._precision.name} ({self._precision.why})")
            self.run.log(f"precision {self._precision.name}: {self._precision.why}")
        return self._precision

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` (in place) on the run's device, its non-quantized tensors in the run's precision."""
        return precision.cast_(model.to(pick_device(self.cfg)), self.precision.dtype)

    @property
    def cache(self) -> Cache:
        return Cache(self.cfg.run.root)

    def load_source(self, weights: bool = True) -> LoadedModel:
        """The source model; with ``weights=False`` a streamable source gives only its tokenizer and
        hash (``model`` None) and its weights load when a later step asks for them."""
        if self.source is None or (weights and self.source.model is None):
            t0 = time.time()
            with ui.status(f"loading {self.cfg.model.path} ..."):
                self.source = load_model(self.cfg.model.path, self.cfg.model.dtype, weights=weights)
            self.tokenizer = self.source.tokenizer
            if self.source.model is not None:
                self.source.model.to(pick_device(self.cfg))
                self.timings["load_s"] = round(time.time() - t0, 1)
                ui.say(f"loaded {self.cfg.model.path} ({self.source.kind}) in {self.timings['load_s']} s")
        return self.source

    def heldout(self) -> torch.Tensor | None:
        """The held-out windows this session made, else the run's cached ones (never generated here)."""
        if "heldout" in self.windows:
            return self.windows["heldout"][0]
        return self.run.heldout_windows(self.base_info, self.tokenizer)

    def windows_for(self, role: str, section: DictConfig):
        """(token windows [n, seq_len], sha256) for calibration ("calib") or held-out perplexity
        ("heldout") from where ``section`` says (Cache.stored_windows); self-generated text is sampled
        from the 16-bit model once and cached by content. Under torch.distributed rank 0 makes them and
        every rank gets rank 0's."""
        if role in self.windows:
            return self.windows[role]
        if dist.active():
            self.windows[role] = dist.from_main(lambda: self.windows_for(role, section))
            return self.windows[role]
        src = self.load_source(weights=section.source == "self")
        windows = self.cache.stored_windows(section, role, self.cfg.model.path, src.source_hash, src.tokenizer)
        if section.source == "self" and windows is not None:
            ui.say(f"{role} text: reusing {section.n_samples} x {section.seq_len} self-generated tokens")
        elif section.source == "self":
            with ui.progress_bar(f"sampling {role} text from the 16-bit model", None, unit="sequences") as advance:
                windows = selfgen.self_text_windows(src.model, src.tokenizer, role, section.n_samples,
                                                    section.seq_len, section.seed, progress=advance)
            path = self.cache.save_text(Cache.text_key(src.source_hash, role, section), windows)
            ui.say(f"{role} text: sampled {section.n_samples * section.seq_len} tokens, cached at {path}")
        elif section.source == "shipped":
            ui.say(f"{role} text: {section.n_samples} x {section.seq_len} tokens shipped with lotaqaf "
                   f"({shipped.path_for(self.cfg.model.path, role).name})")
        self.windows[role] = (windows, "sha256:" + hashlib.sha256(windows.numpy().tobytes()).hexdigest())
        return self.windows[role]

    def records(self) -> list[dict] | None:
        """The training records of a file or hub source (None for self-distilled or shipped data,
        which need the model or its hash): read once, before the model loads, so that bad data is
        refused before any work."""
        d = self.cfg.data
        if d.source in ("self_distill", "shipped"):
            return None
        if self._records is None:
            self._records = sft.load_records(d.source, d.path, d.n_samples, d.seed)
        return self._records

    def examples(self) -> list[dict]:
        """Tokenized, prompt-masked training examples; self-distilled data is generated once and cached.
        Under torch.distributed rank 0 makes them and every rank gets rank 0's."""
        if dist.active():
            return dist.from_main(self.examples)
        d = self.cfg.data
        src = self.load_source(weights=d.source == "self_distill")
        if d.source == "self_distill":
            key = Cache.sft_key(src.source_hash, d)
            records = self.cache.load_sft(key)
            if records is not None:
                ui.say(f"training data: reusing {len(records)} self-distilled examples")
            else:
                with ui.progress_bar("self-distilling training answers from the 16-bit model", d.n_samples,
                                     unit="answers") as adv:
                    records = sft.self_distill_records(src.model, src.tokenizer, d.n_samples, d.target_len, d.seed,
                                                       progress=adv)
                path = self.cache.save_sft(key, records)
                ui.say(f"training data: {len(records)} self-distilled examples cached at {path}")
        elif d.source == "shipped":
            records = shipped.records(self.cfg.model.path, src.source_hash, d.n_samples, d.seed)
            ui.say(f"training data: {len(records)} self-distilled examples shipped with lotaqaf")
        else:
            records = self.records()
        return sft.tokenize_records(src.tokenizer, records, d.source_len, d.target_len)
