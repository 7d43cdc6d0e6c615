"""The serving exports' math and metadata against independent references: the offset branch against a
float64 re-implementation of W' = s * (code - z'), Q4_1 blocks at 3 bits through the gguf package's own
dequantizer, Llama 3.1 rope factors against transformers' rope initialisation, and the GGUF tokenizer
metadata of a Hugging Face tokenizer read back by transformers' GGUF tokenizer converter."""

import copy

import numpy as np
import pytest
import torch
from layers import dense64, random_qlinear
from tiny_models import tiny_tokenizer

from lotaqaf_cli.core.qlinear import QuantLinear
from lotaqaf_cli.errors import LotaqafError
from lotaqaf_cli.io.gguf_export import (
    export_gguf,
    k_quant_blocks,
    layer_type,
    llama3_rope_factors,
    pre_tokenizer_name,
    q4_1_blocks,
    stored_model,
    stored_values,
)
from lotaqaf_cli.stages.export import OffsetBranchLinear, offset_branch


def merged_layer(bits, d_in=96, d_out=48, gs=32, act_order=False, seed=0):
    """A QuantLinear as a merge leaves it: integer codes, fp16 scales, fractional zero points z - mu."""
    return random_qlinear(d_in, d_out, bits, gs, seed=seed, act_order=act_order, zeros="near_integer",
                          scales=(0.002, 0.02), fp16_scales=True)


@pytest.mark.parametrize("bits,act_order", [(2, False), (3, True), (4, False)])
def test_offset_branch_restores_the_fractional_zero_points(bits, act_order, mode):
    mode("torch")  # float32 matmul (the CPU decode kernel is bf16)
    q = merged_layer(bits, act_order=act_order)
    a, b = offset_branch(q)
    z = q.zeros.round().clamp(0, (1 << bits) - 1)
    g = q.g_idx.long()
    gptq = q.scales.double()[g] * (q.codes.double() - z.double()[g])         # what integer-zero GPTQ holds
    assert a.shape == (q.scales.shape[0], q.in_features) and set(a.unique().tolist()) == {0.0, 1.0}
    assert b.shape == (q.out_features, q.scales.shape[0])
    delta = (b.double() @ a.double()).t()                                     # [in, out]
    assert (gptq + delta - dense64(q)).abs().max().item() < 1e-9               # B is float32: 2^-24 relative
    assert (gptq - dense64(q)).abs().max().item() > 1e-3                       # the branch carries something
    plain = QuantLinear.from_quantized(q.codes, q.scales, z, q.g_idx, bits, q.group_size)
    x = torch.randn(3, q.in_features, generator=torch.Generator().manual_seed(1))
    y = OffsetBranchLinear(plain, a, b)(x).double()
    assert (y - x.double() @ dense64(q)).abs().max().item() < 1e-5


def test_integer_zero_points_need_no_branch():
    q = merged_layer(4)
    q.zeros = q.zeros.round().clamp(0, 15)
    assert offset_branch(q) is None


def test_q4_1_holds_3_bit_codes_within_fp16_rounding_of_the_minimum():
    """gguf's own Q4_1 dequantizer on our blocks: w = s * code - s * z' up to fp16 rounding of
    m = -s * z' (|error| <= 2^-11 |m|), and the model evaluating those stored values is what
    stored_model builds."""
    import gguf

    q = merged_layer(3, d_in=128, gs=64)
    raw, err, steps = q4_1_blocks(q, None)
    theirs = torch.from_numpy(np.array(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_1))).double()
    ref = dense64(q).t()
    m = (q.scales.double() * q.zeros.double())[q.g_idx.long()].t()
    assert ((theirs - ref).abs() <= m.abs() * 2**-11 + 1e-7).all()
    assert err <= (m.abs() * 2**-11).max().item() and steps <= 7 * 2**-11
    model = torch.nn.Sequential(copy.deepcopy(q))
    stored = stored_model(model)[0]
    assert (dense64(stored).t() - theirs).abs().max().item() < 1e-6


def k_grid_layer(bits, gs):
    """A layer whose s and s * z' lie on the K-quant grid of its super-blocks (the first group of each
    256 inputs sets d = 2^-10 and dmin = 2^-11 with sc = mn = 63): the K-quants hold it exactly."""
    q = merged_layer(bits, d_in=512, d_out=16, gs=gs)
    g = torch.Generator().manual_seed(2)
    k = torch.randint(1, 64, q.scales.shape, generator=g).double()
    n = torch.randint(0, 64, q.scales.shape, generator=g).double()
    k[:: 256 // gs], n[:: 256 // gs] = 63, 63
    if bits == 2:   # Q2_K: 4-bit sc and mn, d = 2^-10 and dmin = 2^-11 from the 15s
        k, n = (k % 15) + 1, n % 16
        k[:: 256 // gs], n[:: 256 // gs] = 15, 15
    q.scales = (k * 2**-10).float()
    q.zeros = (n * 2**-11 / (k * 2**-10)).float()     # s * z' = n * 2^-11
    return q


@pytest.mark.parametrize("kind,bits,gs", [("q4_k", 4, 64), ("q4_k", 3, 128), ("q2_k", 2, 32)])
def test_k_quants_through_the_gguf_dequantizer(kind, bits, gs):
    """gguf's own Q4_K / Q2_K dequantizer on our blocks gives what stored_values says the file holds;
    values on the K-quant grid come back exactly, others within the measured error."""
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
    for q, on_grid in ((k_grid_layer(bits, gs), True), (merged_layer(bits, d_in=512, d_out=16, gs=gs), False)):
        raw, err, steps = k_quant_blocks(q, None, kind)
        assert raw.shape == (16, 2 * {"q4_k": 144, "q2_k": 84}[kind])
        theirs = torch.from_numpy(np.array(gguf.quants.dequantize(raw, qtype))).double()
        s, z = stored_values(q, kind)
        g = q.g_idx.long()
        held = (s.double()[g] * (q.codes.double() - z.double()[g])).t()
        assert (theirs - held).abs().max().item() < 1e-7
        exact = dense64(q).t()
        assert abs((theirs - exact).abs().max().item() - err) < 1e-7
        if on_grid:
            assert err < 1e-7 and steps < 1e-5
        else:
            assert err > 1e-4   # the grid rounds s and s * z' of a random layer


def test_k_quants_fall_back_to_q4_1_where_they_do_not_fit():
    assert layer_type(merged_layer(4, d_in=512, gs=64), "q4_k") == "q4_k"
    assert layer_type(merged_layer(4, d_in=512, gs=512), "q4_k") == "q4_k"     # whole super-blocks
    assert layer_type(merged_layer(4, d_in=384, gs=64), "q4_k") == "q4_1"      # D_in not a multiple of 256
    assert layer_type(merged_layer(4, d_in=768, gs=96), "q4_k") == "q4_1"      # groups across super-blocks
    assert layer_type(merged_layer(2, d_in=512, gs=64), "q4_1") == "q4_1"


def test_gguf_k_quant_refusals(tmp_path):
    from lotaqaf_cli.io.models import smoke_model

    model = smoke_model()
    with pytest.raises(LotaqafError, match="gguf_type=q4_k changes the model .*add --allow-lossy"):
        export_gguf(model, "smoke", tmp_path / "m.gguf", gguf_type="q4_k")
    model.model.layers[0].self_attn.q_proj = merged_layer(3, d_in=256, d_out=64, gs=64)
    with pytest.raises(LotaqafError, match="q2_k holds 2-bit codes; model.layers.0.self_attn.q_proj is 3-bit"):
        export_gguf(model, "smoke", tmp_path / "m.gguf", gguf_type="q2_k", allow_lossy=True)
    assert not (tmp_path / "m.gguf").exists()


def test_act_order_is_refused_for_gguf_naming_exact_formats(tmp_path):
    from lotaqaf_cli.io.models import smoke_model
    from lotaqaf_cli.stages.export import exact_formats

    model = smoke_model()
    model.model.layers[0].self_attn.q_proj = merged_layer(4, d_in=64, d_out=64, act_order=True)
    formats = exact_formats(model)
    assert formats == ["gptq", "hf16"]
    with pytest.raises(LotaqafError, match="has act-order groups; exact instead: --format gptq or hf16"):
        export_gguf(model, "smoke", tmp_path / "m.gguf", exact=formats)
    assert not (tmp_path / "m.gguf").exists()


def test_llama3_rope_factors_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072, rope_parameters=rope)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    base = 1.0 / 500000.0 ** (torch.arange(0, 128, 2).double() / 128)
    ours = llama3_rope_factors(rope, 128)
    assert np.allclose(ours, (base / inv_freq.double()).numpy(), rtol=1e-5)
    assert ours.min() == 1.0 and ours.max() == 8.0


def test_pre_tokenizer_names():
    llama3 = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    qwen2 = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"

    def split(regex):
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated"}, {"type": "ByteLevel"}]}}

    assert pre_tokenizer_name(split(llama3)) == "llama-bpe"
    assert pre_tokenizer_name(split(qwen2)) == "qwen2"
    smollm = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "add_prefix_space": False}]}}
    assert pre_tokenizer_name(smollm) == "smollm"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel"}}) == "gpt-2"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}}) == "default"


def test_gguf_tokenizer_from_a_hugging_face_tokenizer(tmp_path):
    """A model with a Hugging Face tokenizer: the GGUF's vocabulary, merges and special tokens, read
    back by transformers' GGUF tokenizer converter, tokenize text as the original tokenizer does."""
    import gguf
    from transformers import AutoTokenizer

    from lotaqaf_cli.core.quantize_model import quantize_model
    from lotaqaf_cli.io.models import smoke_model

    tok = tiny_tokenizer()
    model = smoke_model()
    quantize_model(model, [torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(0))], bits=3,
                   group_size=32, method="rtn")
    rep = export_gguf(model, "smoke", tmp_path / "model.gguf", tok)
    assert rep["tokenizer"] == "gpt2" and rep["pre_tokenizer"] == "gpt-2" and rep["merges"] > 0
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert tokens[:len(tok)] == [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == tok.eos_token_id
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="model.gguf")
    for text in ["Question: 1 + 2 = ? Answer: 3", "the quick brown fox 0123456789", "A. B. C. D."]:
        assert back(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("gguf_type,bits", [("q4_1", 4), ("q4_k", 3), ("q2_k", 2)])
def test_gguf_qwen2_layout_in_transformers(gguf_type, bits, tmp_path, mode):
    """A Qwen2 model (q/k/v biases, no rotary row permutation in GGUF): transformers' GGUF loader
    computes what lotaqaf's model holds (the fp16-rounded minimums, or the K-quant grid, evaluated
    in float32)."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from lotaqaf_cli.core.quantize_model import quantize_model

    mode("torch")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    g = torch.Generator().manual_seed(0)
    quantize_model(model, [torch.randint(0, 256, (2, 16), generator=g)], bits=bits, group_size=64, method="rtn")
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.zeros = m.zeros - (torch.rand(m.zeros.shape, generator=g) - 0.5) * 0.6
    rep = export_gguf(model, "smoke", tmp_path / "model.gguf", gguf_type=gguf_type, allow_lossy=True)
    assert rep["layers_by_type"] == {gguf_type: 14}
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="model.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 24), generator=g)
    with torch.no_grad():
        ours = stored_model(model, gguf_type)(ids).logits
        assert (loaded(ids).logits - ours).abs().max().item() < 1e-4
        assert (model(ids).logits - ours).abs().max().item() > 0  # the fp16 minimums are not the exact ones
