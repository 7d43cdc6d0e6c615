"""An export on disk: its size, and the bytes its quantized layers take (what bits per weight counts)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


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
