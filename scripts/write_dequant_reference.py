"""Write DIR/reference_dequant.safetensors: lotaqaf's dequantized weights of a GPTQ checkpoint.

Used to prove that gptqmodel reads lotaqaf's checkpoints the way lotaqaf does:
    .venv/bin/python scripts/write_dequant_reference.py runs/_cache/quantized/<key>
    GPTQMODEL_CPU_WORKERS=2 /work/gptq-venv/bin/python scripts/make_gptq_fixture.py --check runs/_cache/quantized/<key>
"""

import sys

from safetensors.torch import save_file

from lotaqaf_cli.core.qlinear import QuantLinear
from lotaqaf_cli.io.checkpoint import load_quantized


def main(path: str) -> None:
    model, _tok, _info = load_quantized(path)
    ref = {f"{n}.weight": m.dequantize().t().contiguous() for n, m in model.named_modules()
           if isinstance(m, QuantLinear)}
    save_file(ref, f"{path}/reference_dequant.safetensors")
    print(f"wrote {len(ref)} dequantized weights to {path}/reference_dequant.safetensors")


if __name__ == "__main__":
    main(sys.argv[1])
