"""What the lm-eval integrations (:mod:`lotaqaf_cli.eval.mmlu`, :mod:`lotaqaf_cli.eval.lm_eval_tasks`) share:
the installed lm-eval version, the offline environment for local data and the quieting of the
libraries' logging while lm-eval runs in this process."""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os


def lm_eval_version() -> str:
    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@contextlib.contextmanager
def offline_env(offline: bool):
    """HF_DATASETS_OFFLINE / HF_HUB_OFFLINE for the offline source (restored afterwards)."""
    if not offline:
        yield
        return
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def quiet_libraries():
    """lm-eval and datasets log a lot at INFO/WARNING; keep the terminal to our own lines."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "datasets", "evaluate")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import datasets

        bars = datasets.utils.logging.is_progress_bar_enabled()
        datasets.utils.logging.disable_progress_bar()
    except (ImportError, AttributeError):
        bars = None
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, old, strict=True):
            lg.setLevel(lvl)
        if bars:
            datasets.utils.logging.enable_progress_bar()
