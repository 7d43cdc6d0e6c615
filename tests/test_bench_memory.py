"""scripts/bench_memory.py's helpers on a tiny shape: the model it builds loads (streamed and whole) with
the planned parameter count, its training examples fill the lengths, its commands and table."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "scripts" / "bench_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_memory_helpers(tmp_path):
    from transformers import AutoModelForCausalLM

    from lotaqaf_cli.core.plan import Shape
    from lotaqaf_cli.data.sft import load_jsonl, tokenize_records
    from lotaqaf_cli.io.models import model_config
    from lotaqaf_cli.io.shards import ShardedSource

    bm = _bench()
    args = bm.parse(["--hidden", "128", "--intermediate", "256", "--head-dim", "32", "--vocab", "49152",
                     "--layers", "2", "--seq-len", "64", "--stages", "eval,quantize"])
    assert args.stages == ["quantize", "eval"]  # the chain's order
    s = bm.shape_of(args)
    assert (s["heads"], s["kv_heads"]) == (4, 1)
    d = tmp_path / "model"
    tok = bm.build_model(d, s)
    assert len(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]) == 2 + 9 * 2 + 1
    assert len(list(d.glob("*.safetensors"))) == 4  # embeddings | layer 0 | layer 1 | norm + lm_head
    cfg, _ = model_config(str(d))
    assert Shape.from_config(cfg).params == bm.params_of(s)
    assert ShardedSource(d).num_layers == 2
    model = AutoModelForCausalLM.from_pretrained(str(d))
    assert sum(p.numel() for p in model.parameters()) == bm.params_of(s)
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": getattr(cfg, "rope_theta", None)}
    assert not cfg.tie_word_embeddings and rope["rope_theta"] == 500000.0
    assert bm.build_model(d, s) is not None  # the same shape: reused

    f = bm.write_jsonl(tmp_path / "train.jsonl", tok, 3, 48, 16)
    lens = [len(e["input_ids"]) for e in tokenize_records(tok, load_jsonl(str(f)), 48, 16)]
    assert lens == [64, 64, 64]

    common = bm.common_overrides(args, tmp_path, {"calib": "c.txt", "heldout": "h.txt", "train": str(f)})
    assert "data.source_len=48" in common and "data.target_len=16" in common
    assert bm.command_for("train", common, tmp_path / "r")[-2:] == ["stages=[train]", f"run.dir={tmp_path / 'r'}"]
    assert bm.command_for("eval", common, tmp_path / "r")[0] == "eval"
    row = bm.row_of("train", {"gb": 3.0, "parts_gb": {"a": 2.0, "b": 0.5, "c": 0.4, "d": 0.1}}, 1.5, "x", 12.0, {})
    assert row["plan_over_measured"] == 2.0 and [k for k, _ in row["largest_terms"]] == ["a", "b", "c"]
    assert "| train | 3.00 | 1.50 | 2.00 | 12 | a 2.00, b 0.50, c 0.40 |" in bm.table([row])
