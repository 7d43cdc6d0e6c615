"""Ctrl-C (SIGINT) and SIGTERM: one line and exit code 130 / 143, never a traceback.

    with installed():      # the CLI: a signal raises Interrupted wherever the program is
        with deferred():   # training: a signal is only recorded; the loop ends its step, saves a
            ...            # checkpoint and raises Interrupted itself (a second signal: at once)
            if pending(): ...
"""

from __future__ import annotations

import contextlib
import signal
import threading

from .errors import LotaqafError

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}   # 128 + the signal number, as shells report


class Interrupted(LotaqafError):
    """The run was stopped by a signal; ``exit_code`` is 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, signum: int, message: str | None = None):
        self.signum = signum
        self.exit_code = EXIT_CODES.get(signum, 130)
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")


_state = {"deferring": False, "pending": None}


def _handler(signum, _frame):
    if _state["deferring"] and _state["pending"] is None:
        _state["pending"] = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def installed():
    """SIGINT and SIGTERM raise :class:`Interrupted` inside the block (main thread only; the previous
    handlers come back afterwards)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _handler) for s in EXIT_CODES}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def deferred():
    """Inside the block the first signal is recorded (see :func:`pending`) instead of raised."""
    before = dict(_state)
    _state.update(deferring=True, pending=None)
    try:
        yield
    finally:
        _state.update(before)


def pending() -> int | None:
    """The signal received inside :func:`deferred`, if any."""
    return _state["pending"]
