"""Console output: one rich console, progress bars and tables (stages use these; core never does)."""

from __future__ import annotations

import contextlib
import os
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

console = Console(highlight=False, force_terminal=None if sys.stdout.isatty() else False,
                  width=None if sys.stdout.isatty() else 120)


def quiet() -> bool:
    return bool(os.environ.get("LOTAQAF_QUIET"))


@contextlib.contextmanager
def progress_bar(description: str, total: int | None):
    """Yields advance(n) for a bar (or a spinner when total is None)."""
    cols = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn()]
    with Progress(*cols, console=console, transient=False, disable=quiet()) as prog:
        task = prog.add_task(description, total=total)
        yield lambda n=1, **_: prog.advance(task, n)


@contextlib.contextmanager
def status(message: str):
    if quiet():
        yield
        return
    with console.status(message):
        yield


def say(message: str) -> None:
    if not quiet():
        console.print(message)
