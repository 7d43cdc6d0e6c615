"""Console output: one rich console, progress bars and tables (stages use these; core never does)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

# Outside a terminal: no control codes, tables 120 wide, long lines not wrapped (grep-able logs).
console = Console(highlight=False, force_terminal=None if sys.stdout.isatty() else False,
                  width=None if sys.stdout.isatty() else 120, soft_wrap=not sys.stdout.isatty())


# Importing bitsandbytes (ours for quant=nf4, or peft's and transformers' whenever it is installed) tries to
# fetch a CPU kernel from the Hugging Face Hub (bitsandbytes/backends/cpu/ops.py, module level, on AVX512-BF16
# CPUs) and logs a warning when that fails, as it always does offline; it then uses its bundled library, and it
# reads no setting that skips the attempt. Only these messages, on these loggers, are dropped.
_LIBRARY_NOISE = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    ("kernels._internals.hf_hub", "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"),
)


class _DropMessage(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


for _name, _start in _LIBRARY_NOISE:
    logging.getLogger(_name).addFilter(_DropMessage(_start))


def quiet() -> bool:
    return bool(os.environ.get("LOTAQAF_QUIET"))


PLAIN_INTERVAL_S = float(os.environ.get("LOTAQAF_PROGRESS_INTERVAL", "10"))


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class PlainProgress:
    """Progress outside a terminal (a log file, CI): one plain line every PLAIN_INTERVAL_S seconds
    and one at the end, `description: k/N unit (p%), <info>, elapsed, eta`, never a live bar."""

    def __init__(self, description: str, total: int | None, unit: str):
        self.description, self.total, self.unit = description, total, unit
        self.done, self.info = 0, {}
        self.created = self.start = self.last = time.time()
        self.first, self.shown = None, None

    def advance(self, n: int = 1, **info) -> None:
        self.done += n
        self.info.update(info)
        if self.first is None:  # the rate is timed from the first advance (a resumed run starts past 0)
            self.first, self.start = self.done, time.time()
        if time.time() - self.last >= PLAIN_INTERVAL_S:
            self.line()

    def finish(self) -> None:
        if self.shown != (self.done, self.info):  # the last line already says it all
            self.line()

    def line(self) -> None:
        self.last, self.shown = time.time(), (self.done, dict(self.info))
        elapsed, timed = self.last - self.created, self.last - self.start
        parts = [f"{self.done}/{self.total} {self.unit} ({100 * self.done / max(self.total, 1):.0f}%)"
                 if self.total else f"{self.done} {self.unit}"]
        parts += [f"{v:g} {k.replace('_per_s', '/s').replace('_', ' ')}" for k, v in self.info.items()
                  if isinstance(v, (int, float))]
        parts.append(f"{_clock(elapsed)} elapsed")
        made = self.done - (self.first or 0)
        if self.total and 0 < made and self.done < self.total:
            parts.append(f"eta {_clock(timed / made * (self.total - self.done))}")
        console.print(f"{self.description}: " + ", ".join(parts), markup=False)


@contextlib.contextmanager
def progress_bar(description: str, total: int | None, unit: str = ""):
    """Yields advance(n, **info) for a live bar in a terminal (a spinner when total is None), else
    for plain progress lines; ``info`` (e.g. tokens_per_s=...) is shown beside the count."""
    if quiet():
        yield lambda n=1, **_: None
        return
    if not console.is_terminal:
        plain = PlainProgress(description, total, unit)
        yield plain.advance
        plain.finish()
        return
    cols = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*cols, console=console, transient=False) as prog:
        task = prog.add_task(description, total=total, info="")

        def advance(n=1, **info):
            shown = ", ".join(f"{v:g} {k.replace('_per_s', '/s')}" for k, v in info.items()
                              if isinstance(v, (int, float)))
            prog.update(task, advance=n, **({"info": shown} if shown else {}))
        yield advance


@contextlib.contextmanager
def status(message: str):
    """A spinner in a terminal; outside one, the message as a plain line."""
    if quiet():
        yield
        return
    if not console.is_terminal:
        console.print(message, markup=False)
        yield
        return
    with console.status(message):
        yield


def say(message: str) -> None:
    if not quiet():
        console.print(message)


def silence_third_party_progress() -> None:
    """Other libraries' progress bars (tqdm: the GGUF loader, lm-eval, datasets; huggingface_hub's)
    write carriage-return updates that flood a log; lotaqaf shows its own progress instead. Call
    before those libraries are imported (tqdm reads TQDM_DISABLE when it is imported)."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    # torchao (which transformers imports when it is installed) logs a line per CUDA extension it cannot
    # load on a CPU machine, and torch one per Enum torchao registers: noise around lotaqaf's output.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def size(n: int) -> str:
    """Bytes as B / KiB / MiB / GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
