"""`lotaqaf export` on the smoke recipe, each format checked in the engine that reads it: GPTQ (plain
without the offset factor; with it, GPTQ plus the offset branch as a PEFT LoRA, read by PEFT on a dense
base unpacked here from the GPTQ layout), torchao in transformers, GGUF (2 and 4 bits) in transformers'
GGUF loader and the gguf package's dequantizer, hf16. llama.cpp and gptqmodel run in `make check-serving`."""

import json
import shutil

import numpy as np
import pytest
import torch
from cli_helpers import copy_smoke_run, one_line_error, run_commands_in

from lotaqaf_cli.cli import main
from lotaqaf_cli.core.qlinear import quantized_modules
from lotaqaf_cli.io.checkpoint import load_quantized


@pytest.fixture(scope="module")
def runs(tmp_path_factory, smoke_lota_root):
    """Merged smoke runs at INT4 with the offset factor (the session's run, as runs/mu) and without it
    (runs/nomu), and at INT2 (runs/mu2)."""
    cmds = [["merge", "run=runs/mu"]]
    for name, gran, bits in (("nomu", "none", 4), ("mu2", "group", 2)):
        cmds.append(["train", "recipe=smoke", f"run.dir=runs/{name}", "adapter.omega=2", "optim.steps=8",
                     f"adapter.offset_granularity={gran}", f"quant.bits={bits}", "stages=[quantize,train]"])
        cmds.append(["merge", f"run=runs/{name}"])
    return run_commands_in(copy_smoke_run(smoke_lota_root, tmp_path_factory.mktemp("export"), "runs/mu"), cmds)


@pytest.fixture
def here(runs, monkeypatch):
    monkeypatch.chdir(runs)
    return runs


def test_float_zero_checkpoints_do_not_declare_plain_gptq(here):
    """A merged checkpoint that needs its fractional zero points declares a format plain GPTQ loaders
    refuse (in both files they read); an integer-only one, and the GPTQ export, stay plain GPTQ."""
    def declared(d):
        q = json.loads((here / d / "quantize_config.json").read_text())
        c = json.loads((here / d / "config.json").read_text())["quantization_config"]
        assert (q["quant_method"], q["checkpoint_format"]) == (c["quant_method"], c["checkpoint_format"])
        return q["checkpoint_format"]

    assert declared("runs/mu/merged") == "lotaqaf_float_zero"
    assert declared("runs/nomu/merged") == "gptq"
    model, _, _ = load_quantized(here / "runs/mu/merged")  # lotaqaf reads it, with its fractional zeros
    assert any(not torch.equal(q.zeros, q.zeros.round()) for q in quantized_modules(model).values())


def test_gptq_export_exact_without_offset_factor(here):
    assert main(["export", "run=runs/nomu", "--format", "gptq"]) == 0
    rep = json.loads((here / "runs/nomu/export-gptq.json").read_text())
    assert rep["fractional_zero_points"] == 0 and rep["max_abs_logit_diff"] == 0.0
    m, _, _ = load_quantized(here / "runs/nomu/export-gptq")
    merged, _, _ = load_quantized(here / "runs/nomu/merged")
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, merged(ids).logits)


def test_gptq_without_offset_branch_needs_allow_lossy(here, capsys):
    one_line_error(capsys, ["export", "run=runs/mu", "--format", "gptq", "export.offset_branch=false"],
                   "Exact instead: --format gptq (with its offset branch) or --format gguf or torchao or hf16")
    assert not (here / "runs/mu/export-gptq").exists()
    assert main(["export", "run=runs/mu", "--format", "gptq", "export.offset_branch=false", "--allow-lossy",
                 "export.check=false"]) == 0
    rep = json.loads((here / "runs/mu/export-gptq.json").read_text())
    assert rep["fractional_zero_points"] > 0 and rep["max_abs_logit_diff"] > 1e-3
    assert not (here / "runs/mu/export-gptq/offset_lora").exists()
    one_line_error(capsys, ["export", "run=runs/mu", "--format", "gptq"], "already exists")
    shutil.rmtree(here / "runs/mu/export-gptq")


def unpack_gptq(path):
    """Dense float64 weights [out, in] of a 2/4-bit GPTQ checkpoint, read here from the documented
    layout with numpy alone: codes as a little-endian bit stream along the input dim, zero points
    packed along the output dim as z minus the packed all-ones word ("v1")."""
    from safetensors.numpy import load_file

    st = load_file(str(path / "model.safetensors"))
    bits = json.loads((path / "quantize_config.json").read_text())["bits"]
    assert bits in (2, 4)
    per = 32 // bits

    def fields(words):  # uint32 [..., W] -> [..., W * per] fields, lowest first
        w = words.astype(np.uint64)[..., None] >> (np.arange(per, dtype=np.uint64) * bits)
        return (w & ((1 << bits) - 1)).reshape(*words.shape[:-1], -1).astype(np.float64)

    out = {}
    for key in st:
        if not key.endswith(".qweight"):
            continue
        name = key[: -len(".qweight")]
        qw = st[key].view(np.uint32)                            # [in / per, out]
        codes = fields(qw.T).T                                  # [in, out]
        ones = sum(1 << (k * bits) for k in range(per))
        qz = (st[name + ".qzeros"].view(np.uint32).astype(np.uint64) + ones) % (1 << 32)
        zeros = fields(qz)                                      # [G, out]
        g = st[name + ".g_idx"].astype(np.int64)
        scales = st[name + ".scales"].astype(np.float64)
        out[name] = (scales[g] * (codes - zeros[g])).T
    return out, st


def test_gptq_export_with_offset_branch_in_peft(here):
    """The default GPTQ export of an offset run: a plain GPTQ checkpoint and the offset branch as a PEFT
    LoRA. PEFT applies it on a dense model built from the GPTQ files by the reader above, and gives the
    merged model's greedy continuations and logits."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from lotaqaf_cli.serving.probe import probe_prompts, reference_probe

    assert main(["export", "run=runs/mu", "--format", "gptq"]) == 0
    rep = json.loads((here / "runs/mu/export-gptq.json").read_text())
    assert rep["fractional_zero_points"] > 0 and rep["max_abs_logit_diff"] < 1e-4
    # 4-bit codes, fp16 scales and packed zeros per 32, plus fp32 A [G, in] and B [out, G] (G = in / 32)
    assert 4 + 16 / 32 + 4 / 32 + 32 * 2 / 32 < rep["bits_per_weight"] < 4 + 16 / 32 + 4 / 32 + 32 * 2 / 32 + 1
    assert rep["offset_branch_layers"] == 14
    eng = rep["engines"]["gptqmodel_peft"]  # gptqmodel is not a dependency: `make check-serving` runs it
    assert (eng["same_continuations"] == 8) if eng["checked"] else ("not installed" in eng["why"]), eng
    d = here / "runs/mu/export-gptq"
    cfg = json.loads((d / "offset_lora/adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == cfg["lora_alpha"] == 64 // 32
    assert cfg["rank_pattern"] == cfg["alpha_pattern"] == {"down_proj": 128 // 32}

    merged, _, _ = load_quantized(here / "runs/mu/merged")
    dense_w, st = unpack_gptq(d)
    dense = LlamaForCausalLM(merged.config)
    sd = {k: torch.from_numpy(v.copy()).float() for k, v in st.items() if v.dtype in (np.float32, np.float16)
          and not k.endswith((".scales", ".zero_points"))}
    sd.update({f"{n}.weight": torch.from_numpy(w).float() for n, w in dense_w.items()})
    missing = dense.load_state_dict(sd, strict=False).missing_keys
    assert missing in ([], ["lm_head.weight"])  # tied
    dense.tie_weights()
    prompts = probe_prompts(None, merged.config.vocab_size)
    conts, ref = reference_probe(merged, prompts)
    _, plain = reference_probe(dense.eval(), prompts, forced_on=conts)   # GPTQ alone: the offset is missing
    assert max(np.abs(a - b).max() for a, b in zip(ref, plain, strict=True)) > 1e-3
    peft_model = PeftModel.from_pretrained(dense, str(d / "offset_lora")).eval()
    assert isinstance(peft_model.base_model.model.model.layers[0].mlp.down_proj.lora_A["default"], torch.nn.Linear)
    got_conts, got = reference_probe(peft_model, prompts, forced_on=conts)
    assert got_conts == conts
    assert max(np.abs(a - b).max() for a, b in zip(ref, got, strict=True)) < 1e-4


def test_torchao_export_in_transformers(here):
    """transformers (with torchao, in the engine subprocess) loads the torchao export as torchao's tensor
    subclass and computes the merged model; the file holds s * (code - z') with the fractional z'."""
    from safetensors.torch import load_file

    assert main(["export", "run=runs/mu2", "--format", "torchao"]) == 0
    rep = json.loads((here / "runs/mu2/export-torchao.json").read_text())
    eng = rep["engines"]["transformers"]
    assert eng["checked"] and eng["same_continuations"] == 8 and eng["max_abs_logit_diff"] < 1e-4, eng
    assert "torchao" in eng["engine"] and "IntxUnpackedToInt8Tensor" in eng["linear_weight_classes"]
    st = load_file(str(here / "runs/mu2/export-torchao/model.safetensors"))
    merged, _, _ = load_quantized(here / "runs/mu2/merged")
    for name, q in quantized_modules(merged).items():
        z = st[f"{name}._weight_zero_point"].double()                      # [out, G]
        w = st[f"{name}._weight_scale"].double().repeat_interleave(32, 1) * (
            st[f"{name}._weight_qdata"].double() - z.repeat_interleave(32, 1))
        g = q.g_idx.long()
        ref = (q.scales.double()[g] * (q.codes.double() - q.zeros.double()[g])).t()
        assert (w - ref).abs().max().item() < 1e-7, name
    assert any(not torch.equal(z, z.round()) for z in (st[k] for k in st if k.endswith("_zero_point")))


@pytest.mark.parametrize("run", ["mu2"])  # 4 bits: test_gguf_export.py (SmolLM2) and test_serving.py (Qwen2)
def test_gguf_export_of_an_hf_source(here, run):
    """2-bit merged layers as Q4_1 from a model that is not GGUF-sourced: the gguf package's own
    dequantizer gives the merged weights within the fp16 rounding of the block minimum, and
    transformers' GGUF loader the merged model's continuations."""
    import gguf

    from lotaqaf_cli.io.gguf_export import gguf_name, rotary_row_order

    assert main(["export", f"run=runs/{run}", "--format", "gguf"]) == 0
    rep = json.loads((here / f"runs/{run}/export-gguf.json").read_text())
    assert rep["layers_by_type"] == {"q4_1": 14} and rep["max_weight_error_in_steps"] <= 15 * 2**-11
    eng = rep["engines"]["gguf_transformers"]
    assert eng["checked"] and eng["same_continuations"] == 8, eng
    assert eng["max_abs_logit_diff"] <= 2 * rep["max_abs_logit_diff"] + 1e-5  # no more than fp16 storage explains
    merged, _, _ = load_quantized(here / f"runs/{run}/merged")
    reader = gguf.GGUFReader(str(here / f"runs/{run}/export-gguf/model.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    for name, q in quantized_modules(merged).items():
        t = tensors[gguf_name(name + ".weight")]
        theirs = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).double()
        g = q.g_idx.long()
        m = (q.scales.double() * q.zeros.double())[g]
        ref = (q.scales.double()[g] * q.codes.double() - m).t()
        if "q_proj" in name or "k_proj" in name:
            ref = ref[rotary_row_order(q.out_features, 4 if "q_proj" in name else 2)]
            m = m.t()[rotary_row_order(q.out_features, 4 if "q_proj" in name else 2)].t()
        assert ((theirs - ref).abs() <= m.t().abs() * 2**-11 + 1e-7).all(), name


def test_hf16_export(here):
    from transformers import AutoModelForCausalLM

    assert main(["export", "run=runs/mu", "--format", "hf16"]) == 0
    rep = json.loads((here / "runs/mu/export-hf16.json").read_text())
    assert rep["max_abs_logit_diff"] < 1e-4
    dense = AutoModelForCausalLM.from_pretrained(str(here / "runs/mu/export-hf16"))
    merged, _, _ = load_quantized(here / "runs/mu/merged")
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (dense(ids).logits - merged(ids).logits).abs().max().item() < 1e-4
