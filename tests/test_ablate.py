"""scripts/ablate.py without training: the recovery formula and the crossing count against hand
computations, and the report (markdown rows, clipped chart) from a results dict."""

import math

import torch
from cli_helpers import load_script

from lotaqaf_cli.core.qlinear import QuantLinear
from lotaqaf_cli.core.ternary import TernaryLinear


def test_recovery_in_log_perplexity():
    ab = load_script("ablate")
    assert ab.recovery(100.0, 100.0, 10.0) == 0.0 and ab.recovery(10.0, 100.0, 10.0) == 1.0
    assert math.isclose(ab.recovery(math.sqrt(1000.0), 100.0, 10.0), 0.5)   # halfway in log space
    assert ab.recovery(200.0, 100.0, 10.0) < 0                               # worse than GPTQ


def test_crossing_counts_products_above_omega_even_with_markers_off():
    ab = load_script("ablate")
    codes = torch.full((4, 3), 1, dtype=torch.uint8)
    base = QuantLinear.from_quantized(codes, torch.ones(1, 3), torch.zeros(1, 3), torch.zeros(4, dtype=torch.int32),
                                      2, 4)
    layer = TernaryLinear(base, rank=2, omega=1.5, markers=False)
    with torch.no_grad():
        layer.A_T.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0], [0.0, 1.0], [0.0, 0.0]]))
        layer.B_T.copy_(torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, -1.0]]))
    # dW = A_T @ B_T = [[2,0,0],[0,0,2],[1,0,-1],[0,0,0]]: two of 12 entries have |dW| > 1.5, max 2
    model = torch.nn.Sequential(layer)
    got = ab.crossing(model)
    assert got == {"crossing_frac": 2 / 12, "max_abs_dW_over_omega": 2 / 1.5}
    assert layer.marker_stats()["plus"] == 0   # markers off: nothing applied, though two cross


def test_report_rows_and_chart(tmp_path):
    ab = load_script("ablate")
    row = dict(bits=3, group_size=64, rank=64, omega=48, offset_granularity="group", markers=True,
               schedule="reference", steps=40, codes_changed=2e-6, codes_up=1e-6, codes_down=1e-6,
               blocked_frac=0.0, crossing_frac=3e-6, max_abs_dW_over_omega=1.2, train_seconds=300.0, run="r")
    rows = [{**row, "variant": "full", "what": "", "ppl": 9.0, "recovery": 0.4},
            {**row, "variant": "omega_0.125", "what": "", "omega": 8, "ppl": 4819.0, "recovery": -8.5}]
    res = {"command": "python scripts/ablate.py", "note": "a note", "partial": False, "rows": rows,
           "fp16_ppl": 6.07, "gptq_ppl": {"3": 12.2}, "seconds": 60.0, "date": "2026-12-02", "machine": "m",
           "settings": {"recipe": "smollm2_mmlu", "steps": [40], "seed": 0, "heldout": [16, 256],
                        "heldout_hash": "h", "data": "shipped (128 examples)"}}
    ab.write_outputs(res, tmp_path / "abl")
    md = (tmp_path / "abl.md").read_text()
    assert "| INT3 g64 | full | 64 | 48 | group | on | reference | 9.0000 | 0.400 |" in md
    assert "| INT3 g64 | omega_0.125 | 64 | 8 |" in md and "a note" in md and "Partial" not in md
    assert (tmp_path / "abl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp*"))
