"""Run an export in a real engine (lotaqaf_cli/consumers.py, in a subprocess) and measure the export on
disk: size and bits per weight of its quantized layers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .. import consumers


def engine_check(kind: str, export_dir: Path, prompts, ref_conts, ref_logits, pythons: list[str],
                 texts: list[str] | None = None, timeout: float = 3600) -> dict:
    """The engine's greedy continuations and logits compared with lotaqaf's (stages.export.compare_probe),
    from the first interpreter in ``pythons`` that has the engine; `checked: false` and why otherwise."""
    from ..stages.export import compare_probe

    why = None
    with tempfile.TemporaryDirectory() as d:
        probe, out = Path(d) / "probe.json", Path(d) / "out.npz"
        probe.write_text(json.dumps({"prompts": prompts, "continuations": ref_conts, "texts": texts}))
        for python in pythons:
            env = engine_env(python)
            r = subprocess.run([python, consumers.__file__, kind, str(export_dir.resolve()), str(probe), str(out)],
                               capture_output=True, text=True, timeout=timeout, env=env, cwd=d)
            last = (r.stderr.strip().splitlines() or ["(no message)"])[-1]
            last = last if len(last) <= 300 else last[:300] + " ..."
            if r.returncode == consumers.MISSING:
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


def disk_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def quantized_layer_bytes(export_dir: Path, fmt: str, layer_names: list[str]) -> int:
    """Bytes the quantized linears take in the export (codes, scales, zeros, group index and, for
    gptq, the offset branch): what bits per weight counts."""
    if fmt == "gguf":
        import gguf

        from .gguf_export import gguf_name

        names = {gguf_name(n + ".weight") for n in layer_names}
        return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(export_dir / "model.gguf")).tensors if t.name in names)
    from safetensors import safe_open

    prefixes = tuple(n + "." for n in layer_names) + tuple("base_model.model." + n + "." for n in layer_names)
    total = 0
    for f in export_dir.rglob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                if k.startswith(prefixes) and not k.endswith((".markers", ".bias")):
                    sl = st.get_slice(k)
                    shape, dtype = sl.get_shape(), sl.get_dtype()
                    total += int(np.prod(shape)) * DTYPE_BYTES[dtype]
    return total


DTYPE_BYTES = {"F64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "I64": 8, "BOOL": 1}
