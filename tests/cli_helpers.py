"""Helpers for the tests that drive the `lotaqaf` command line in a temporary directory, or a script
under scripts/. conftest.py registers this module as a plugin, so its fixtures (``in_tmp``) need no
import (importing a fixture into a test module trips ruff's F811 on the argument of that name)."""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest


def run_commands_in(root: Path, commands: list[list[str]]) -> Path:
    """Run each argv of ``commands`` through the CLI with ``root`` as the working directory; each
    must exit 0. Returns ``root``."""
    from lotaqaf_cli.cli import main

    cwd = os.getcwd()
    os.chdir(root)
    try:
        for argv in commands:
            assert main(argv) == 0, argv
    finally:
        os.chdir(cwd)
    return root


SMOKE_RUN = "runs/smoke/a"


@pytest.fixture(scope="session")
def smoke_lota_root(tmp_path_factory) -> Path:
    """A folder whose runs/ holds one smoke run (LoTA-QAF, omega 2, 8 steps, INT4 g32; quantize, train and
    ppl; not merged) at SMOKE_RUN, with its cached base: trained once per test session for the tests of
    the commands that act on a run. Copy it (copy_smoke_run) before changing anything."""
    return run_commands_in(tmp_path_factory.mktemp("smoke-lota"), [
        ["train", "recipe=smoke", f"run.dir={SMOKE_RUN}", "adapter.omega=2", "optim.steps=8",
         "stages=[quantize,train,ppl]"]])


def copy_smoke_run(smoke_lota_root: Path, root: Path, name: str = SMOKE_RUN) -> Path:
    """The session's smoke run copied into ``root``/runs (with the cache its quantize.json points at,
    relative to ``root``) as ``name``; returns ``root``."""
    shutil.copytree(smoke_lota_root / "runs", root / "runs", dirs_exist_ok=True)
    if name != SMOKE_RUN:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(root / SMOKE_RUN, root / name)
    return root


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """The test's temporary directory, made the working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def one_line_error(capsys, argv, needle="", code=2, prefix="lotaqaf: error: ") -> str:
    """The CLI exits ``code`` with exactly one line on stderr, starting with ``prefix`` and containing
    ``needle``, and no traceback anywhere. Returns that line."""
    from lotaqaf_cli.cli import main

    capsys.readouterr()
    assert main(argv) == code, argv
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(prefix) and needle in err, err
    assert "Traceback" not in cap.err + cap.out
    return err


def load_script(name: str):
    """scripts/<name>.py as a module (scripts/ is not a package; it goes on sys.path, as when a script runs,
    for the helpers the scripts share)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
