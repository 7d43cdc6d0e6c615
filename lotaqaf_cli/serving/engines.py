"""The engines each export format is served by, and the check of an export in one of them: serving/child.py
run in a subprocess (this interpreter, else ``export.check_python``), compared with lotaqaf's probe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from . import child
from .probe import compare_probe

FORMAT_ENGINES = {  # the engines (child.py's kinds) each format is checked in
    "gguf": ["llama_cpp", "gguf_transformers"], "torchao": ["transformers"], "gptq": ["gptqmodel_peft"],
    "hf16": ["transformers"],
}


def engines_for(fmt: str, offset_branch: bool) -> list[str]:
    """A GPTQ export without an offset branch is a plain GPTQ checkpoint: gptqmodel alone serves it."""
    return FORMAT_ENGINES[fmt] if fmt != "gptq" or offset_branch else ["gptqmodel"]


def engine_check(kind: str, export_dir: Path, prompts, ref_conts, ref_logits, pythons: list[str],
                 texts: list[str] | None = None, timeout: float = 3600) -> dict:
    """The engine's greedy continuations and logits compared with lotaqaf's (probe.compare_probe), from
    the first interpreter in ``pythons`` that has the engine; `checked: false` and why otherwise."""
    why = None
    with tempfile.TemporaryDirectory() as d:
        probe, out = Path(d) / "probe.json", Path(d) / "out.npz"
        probe.write_text(json.dumps({"prompts": prompts, "continuations": ref_conts, "texts": texts}))
        for python in pythons:
            r = subprocess.run([python, child.__file__, kind, str(export_dir.resolve()), str(probe), str(out)],
                               capture_output=True, text=True, timeout=timeout, env=engine_env(python), cwd=d)
            last = (r.stderr.strip().splitlines() or ["(no message)"])[-1]
            last = last if len(last) <= 300 else last[:300] + " ..."
            if r.returncode == child.EXIT_MISSING:
                why = f"{last} ({python})"
                continue
            if r.returncode != 0:
                return {"checked": False, "why": f"the engine failed ({python}): {last}"}
            with np.load(out) as z:
                n = len(prompts)
                result = compare_probe(ref_conts, ref_logits, [z[f"greedy_{i}"].tolist() for i in range(n)],
                                       [z[f"logits_{i}"] for i in range(n)])
                return {"checked": True, "engine": str(z["engine"]), "python": python, **result,
                        **json.loads(str(z["extra"]))}
    return {"checked": False, "why": why}


def engine_env(python: str) -> dict:
    """The engine subprocess's environment: this one, with this venv's `engines/` folder on the path
    when the engine runs in this interpreter (`make setup` installs torchao there, out of lotaqaf's own
    imports: transformers imports torchao whenever it can, which costs seconds per process)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    engines = Path(sys.prefix) / "engines"
    if python == sys.executable and engines.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(engines), env.get("PYTHONPATH")) if p)
    return env


def default_pythons(check_python: str | None) -> list[str]:
    return [sys.executable] + ([str(check_python)] if check_python else [])
