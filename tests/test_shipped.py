"""The offline data shipped for the embedded model (lotaqaf_cli/data/shipped/): made from that
model, with the recipe's settings, intact, small, and read the way the sections ask.

Regenerating them takes ~10 minutes; `python scripts/make_shipped_data.py --check` does that and
compares (at one thread, as they were made)."""

import hashlib
import json

import pytest
import torch

from lotaqaf_cli.config import compose
from lotaqaf_cli.data import selfgen, shipped
from lotaqaf_cli.errors import LotaqafError
from lotaqaf_cli.io.models import embedded_model_path

MODEL = "embedded:smollm2"


@pytest.fixture(scope="module")
def model_hash():
    h = hashlib.sha256(embedded_model_path("smollm2").read_bytes()).hexdigest()  # independent of file_sha256
    return "sha256:" + h


def test_files_are_small_and_made_from_the_embedded_model(model_hash):
    total = 0
    for role in shipped.ROLES:
        path = shipped.path_for(MODEL, role)
        total += path.stat().st_size
        header, payload = shipped.read(MODEL, role, model_hash)  # format, payload sha256, model hash
        assert header["model_hash"] == model_hash and header["role"] == role and header["threads"] == 1
        assert header["generated_by"].startswith("python scripts/make_shipped_data.py")
        assert {"torch", "transformers"} <= set(header["versions"])
        assert len(payload) == header["n_samples"]
    assert total < 1_000_000


def test_settings_are_the_default_recipes():
    cfg = compose(["recipe=smollm2_mmlu"])
    assert (cfg.calib.source, cfg.ppl.source, cfg.data.source) == ("shipped",) * 3
    for role, sec in (("calib", cfg.calib), ("heldout", cfg.ppl)):
        header, rows = shipped.read(MODEL, role)
        assert (header["n_samples"], header["seq_len"], header["seed"]) == (sec.n_samples, sec.seq_len, sec.seed)
        assert {len(r) for r in rows} == {sec.seq_len}
    header, recs = shipped.read(MODEL, "train")
    d = cfg.data
    assert (header["n_samples"], header["target_len"], header["seed"]) == (d.n_samples, d.target_len, d.seed)
    # training prompts come from the bank's "train" share only (disjoint from calibration and held-out)
    prompts = {r["messages"][0]["content"] for r in recs}
    assert prompts and all(selfgen.prompt_role(p) == "train" for p in prompts)
    assert all(r["messages"][1]["role"] == "assistant" and r["messages"][1]["content"] for r in recs)


def test_windows_and_records_as_asked(model_hash):
    _, rows = shipped.read(MODEL, "heldout")
    w = shipped.windows(MODEL, "heldout", model_hash, 3, 100, seed=4321)
    assert w.dtype == torch.long and torch.equal(w, torch.tensor([r[:100] for r in rows[:3]]))
    assert len(shipped.records(MODEL, model_hash, 5, seed=7)) == 5
    with pytest.raises(LotaqafError, match="generated from a model with hash"):
        shipped.windows(MODEL, "heldout", "sha256:" + "0" * 64, 3, 100, seed=4321)
    with pytest.raises(LotaqafError, match="ppl.seq_len=512 asks for more"):
        shipped.windows(MODEL, "heldout", model_hash, 3, 512, seed=4321)


def test_a_modified_file_is_refused(tmp_path, monkeypatch):
    src = shipped.path_for(MODEL, "calib")
    obj = json.loads(src.read_text())
    obj["windows"][0][0] += 1
    (tmp_path / src.name).write_text(json.dumps(obj))
    monkeypatch.setattr(shipped, "DIR", tmp_path)
    with pytest.raises(LotaqafError, match="does not match its sha256"):
        shipped.read(MODEL, "calib")


@pytest.mark.slow
def test_same_data_same_numbers(smollm2_loaded):
    """The 16-bit held-out perplexity on the shipped windows is the one docs/results reports (made on
    another run of this machine): the data no longer depends on where it was sampled."""
    from pathlib import Path

    from lotaqaf_cli import precision
    from lotaqaf_cli.core.perplexity import perplexity

    ablation = json.loads((Path(__file__).resolve().parents[1] / "docs/results/ablation.json").read_text())
    reported, dtype = ablation["fp16_ppl"], precision.DTYPES[ablation["settings"].get("precision", "fp32")]
    w = shipped.windows(MODEL, "heldout", smollm2_loaded.source_hash, 16, 256, seed=4321)
    got, n_tok = perplexity(precision.cast_copy(smollm2_loaded.model, dtype).eval(), w)
    assert n_tok == 16 * 255
    assert got == pytest.approx(reported, rel=1e-4)
