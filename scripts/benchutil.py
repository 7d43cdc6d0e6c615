"""Timing helper shared by the scripts/bench_*.py scripts (run from the repository root)."""

from __future__ import annotations

import statistics
import time


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
