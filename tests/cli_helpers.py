"""Helpers for the tests that drive the `lotaqaf` command line in a temporary directory, or a script
under scripts/."""

import importlib.util
import os
from pathlib import Path

from lotaqaf_cli.cli import main


def run_commands_in(root: Path, commands: list[list[str]]) -> Path:
    """Run each argv of ``commands`` through the CLI with ``root`` as the working directory; each
    must exit 0. Returns ``root``."""
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for argv in commands:
            assert main(argv) == 0, argv
    finally:
        os.chdir(cwd)
    return root


def one_line_error(capsys, argv, needle):
    """The CLI exits 2 with exactly one line on stderr containing ``needle``."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def load_script(name: str):
    """scripts/<name>.py as a module (scripts/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
