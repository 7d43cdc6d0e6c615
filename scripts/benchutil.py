"""Timing and memory helpers shared by the scripts/bench_*.py scripts (run from the repository root; no
lotaqaf or torch import, so a side venv's child process can use them too)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path


def status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmRSS, VmHWM); 0 where there is none."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_host_peak() -> int:
    """Reset VmHWM to the current resident set (/proc/self/clear_refs); returns that resident set in kB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return status_kb("VmRSS")


def median_time(fn, reps: int = 10, warmup: int = 2) -> float:
    """Median wall-clock seconds of ``fn()`` over ``reps`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)
