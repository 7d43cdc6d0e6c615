"""The one probe of the Hugging Face hub: model loading, hub datasets and lm-eval's hub tasks ask it."""

from __future__ import annotations

import functools
import os
import socket


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when HF_HUB_OFFLINE is set or the hub's host cannot be reached quickly (probed once
    per process and host: every stage asks)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    return _host_reachable(host, timeout)


@functools.lru_cache(maxsize=8)
def _host_reachable(host: str, timeout: float) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False
