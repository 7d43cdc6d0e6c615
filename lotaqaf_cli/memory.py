"""Memory of the running process: the peak of one stage, and the capacity of a device.

    reset_peak(device)     start a new peak (CUDA: the allocator's peak; CPU: the resident set's
                           high-water mark, reset through /proc/self/clear_refs where Linux allows it)
    peak_bytes(device)     the peak since the last reset (None where it cannot be read)
    current_bytes(device)  what is held now (CUDA: the allocator's reserved memory; CPU: the resident set)
    capacity_bytes(device) the device's memory (CUDA: total; CPU: the machine's RAM)
    trim_heap()            hand freed heap memory back to the operating system (glibc)

What `lotaqaf plan` predicts (core/plan.py) is checked against what these read (run records'
`memory` entries, docs/results/plan.md).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")


def _status_kib(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # "5" resets the resident set's high-water mark (VmHWM) to the current resident set
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_reserved(device))
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def current_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.memory_reserved(device))
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def capacity_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def trim_heap() -> None:
    """Hand freed heap memory back to the operating system: glibc keeps it otherwise, so the resident
    set after a stage (or a streamed layer) would still hold that stage's freed buffers. A no-op
    where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
