"""Stage `export`: a merged model in formats other engines load.

    convert(merged, fmt, ...)           -> (the model as the files hold it, offset branches, report)
    exact_formats(merged)               -> the formats that hold it exactly (what refusals suggest)
    compare(merged, exported, windows)  -> max |logit difference| (and perplexities)
    probe_prompts / reference_probe / compare_probe: the serving check (8 prompts, 32 greedy tokens)

gptq  a standard GPTQ checkpoint (integer zero points). With the offset factor the merged zero points
      z' are fractional; the export then rounds them to integers z and adds the difference back as a
      standard LoRA branch (the "offset branch"): x @ W' = x @ W_gptq + groupsum(x) @ (s * (z - z')),
      lora_A [G, D_in] the 0/1 group indicator, lora_B [D_out, G] = (s * (z - z'))^T, rank G, alpha G.
      `export.offset_branch=false` rounds without the branch (lossy: refused unless export.allow_lossy).
gguf  llama.cpp GGUF (io/gguf_export.py writes it from the merged model itself; 2-, 3- and 4-bit
      layers map onto Q4_1 exactly up to fp16 rounding of the block minimum).
hf16  dequantized weights in the source architecture (safetensors), for any engine.
Takes the recipe's `export` section; the command layer writes the files and runs the engines.
"""

from __future__ import annotations

import copy

import lotaqaf_kernels as kernels
import torch
from torch import nn

from ..consumers import forced_logits, greedy_continuations
from ..core.merge import probe_batch
from ..core.perplexity import perplexity
from ..core.qlinear import QuantLinear, quantized_modules, replace_module
from ..errors import LotaqafError
from ..io.gguf_export import q4_1_exact
from ..io.torchao_export import contiguous_groups


def dense_bytes(model: nn.Module) -> int:
    """Bytes of a float32 copy of the model's quantized layers (:func:`dequantized_model`)."""
    return 4 * sum(q.in_features * q.out_features for q in quantized_modules(model).values())


def dequantized_model(model: nn.Module, dtype=torch.float32) -> nn.Module:
    """Every QuantLinear replaced by a plain nn.Linear holding its dequantized weight."""
    out = copy.deepcopy(model)
    for name, q in quantized_modules(out).items():
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(q.dequantize(torch.float32).t())
            if q.bias is not None:
                lin.bias.copy_(q.bias)
        replace_module(out, name, lin)
    return out


def rounded_zero_model(model: nn.Module) -> tuple[nn.Module, int]:
    """The same codes and scales with integer zero points (what plain GPTQ can hold)."""
    out = copy.deepcopy(model)
    n_frac = 0
    for name, q in quantized_modules(out).items():
        z = q.zeros.round().clamp(0, (1 << q.bits) - 1)
        n_frac += int((z != q.zeros).sum())
        replace_module(out, name, QuantLinear.from_packed(q.qweight, q.in_features, q.scales, z, q.g_idx, q.bits,
                                                         q.group_size, q.bias))
    return out, n_frac


def offset_branch(q: QuantLinear) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The LoRA pair (A [G, D_in], B [D_out, G], float32) that restores a layer's fractional zero points
    z' on top of integer ones z = round(z'): s * (code - z') = s * (code - z) + s * (z - z'), so
    x @ W'^T = x @ W_gptq^T + (x @ A^T) @ B^T with A[g, i] = [g_idx[i] == g], B = (s * (z - z'))^T.
    None when the zero points are integers already."""
    z = q.zeros.round().clamp(0, (1 << q.bits) - 1)
    if torch.equal(z, q.zeros):
        return None
    groups = q.scales.shape[0]
    a = (q.g_idx.long().unsqueeze(0) == torch.arange(groups).unsqueeze(1)).float()
    b = (q.scales.double() * (z.double() - q.zeros.double())).t().float()
    return a, b


class OffsetBranchLinear(nn.Module):
    """A GPTQ layer (integer zero points) plus its offset branch: what GPTQ engine + LoRA compute."""

    def __init__(self, base: QuantLinear, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("lora_A", a)
        self.register_buffer("lora_B", b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t().to(x.dtype)) @ self.lora_B.t().to(x.dtype)


def offset_branch_model(model: nn.Module) -> tuple[nn.Module, dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """(the GPTQ model with integer zeros; the offset branches by layer name; their cost: extra
    parameters, and multiply-adds per token as a fraction of the quantized layers')."""
    plain, n_frac = rounded_zero_model(model)
    branches, extra, weights = {}, 0, 0
    for name, q in quantized_modules(model).items():
        weights += q.in_features * q.out_features
        pair = offset_branch(q)
        if pair is not None:
            branches[name] = pair
            extra += pair[0].numel() + pair[1].numel()
    return plain, branches, {"fractional_zero_points": n_frac, "offset_branch_layers": len(branches),
                             "offset_branch_parameters": extra, "quantized_weights": weights,
                             "offset_branch_macs_per_token_ratio": extra / max(weights, 1)}


def with_branches(plain: nn.Module, branches: dict) -> nn.Module:
    """The GPTQ model plus its offset branches as one module: what a GPTQ engine with LoRA computes."""
    out = copy.deepcopy(plain)
    for name, pair in branches.items():
        replace_module(out, name, OffsetBranchLinear(out.get_submodule(name), *pair))
    return out


@torch.no_grad()
def compare(a: nn.Module, b: nn.Module, windows: torch.Tensor | None = None) -> dict:
    probe = probe_batch(a.config.vocab_size)
    out = {"max_abs_logit_diff": (a(probe).logits.float() - b(probe).logits.float()).abs().max().item()}
    if windows is not None:
        pa, n = perplexity(a, windows)
        pb, _ = perplexity(b, windows)
        out["perplexity"] = {"merged": pa, "export": pb, "change": pb - pa, "tokens": n}
    return out


def exact_formats(model: nn.Module) -> list[str]:
    """The export formats that hold this merged model exactly (what a refusal may suggest): gguf for
    layers of 2-4 bits in contiguous groups of a multiple of 32 (Llama and Qwen2 layouts), torchao for
    contiguous groups, gptq always (with the offset branch when the zero points are fractional), hf16
    always."""
    qmods = quantized_modules(model).values()
    gguf_ok = model.config.model_type in ("llama", "qwen2") and all(q4_1_exact(q) for q in qmods)
    torchao_ok = all(contiguous_groups(q) for q in qmods)
    return ["gguf"] * gguf_ok + ["torchao"] * torchao_ok + ["gptq", "hf16"]


@torch.no_grad()
def convert(model: nn.Module, fmt: str, allow_lossy: bool = False, offset_branch: bool = True,
            exact: list[str] | None = None):
    """gptq: integer zero points plus, where they were fractional, the offset branch (or, with
    ``offset_branch=False``, rounded: refused unless allow_lossy; the refusal names the formats in
    ``exact``); hf16: dense. Returns (the model as the files hold it, the offset branches (gptq) or None,
    report); the model as the format computes it is :func:`with_branches` of the first two."""
    if fmt == "gptq":
        if offset_branch:
            return offset_branch_model(model)
        plain, n_frac = rounded_zero_model(model)
        if n_frac and not allow_lossy:
            others = [f for f in exact or exact_formats(model) if f != "gptq"]
            raise LotaqafError(f"{n_frac} zero points are fractional (offset factor); GPTQ without the offset branch "
                               f"cannot hold them. Exact instead: --format gptq (with its offset branch) or "
                               f"--format {' or '.join(others)} (or --allow-lossy to round them and measure the change)")
        return plain, {}, {"fractional_zero_points": n_frac}
    if fmt == "hf16":
        return dequantized_model(model), None, {}
    raise ValueError(fmt)


# ----------------------------------------------------------------------------------------------------
# the serving check: the same 8 prompts in lotaqaf and in the engine
# ----------------------------------------------------------------------------------------------------
PROBE_TEXTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Photosynthesis is the process by which",
    "Question: What is 17 + 25?\nAnswer:",
    "Once upon a time, in a small village,",
    "The three laws of thermodynamics state that",
    "Translate to French: I would like a cup of coffee.\n",
    "A list of prime numbers: 2, 3, 5,",
)
PROBE_NEW_TOKENS = 32
ENGINES = {  # the engines each format is checked in (consumers.py); gptq without an offset branch: gptqmodel
    "gguf": ["llama_cpp", "gguf_transformers"], "torchao": ["transformers"], "gptq": ["gptqmodel_peft"],
    "hf16": ["transformers"],
}


def probe_prompts(tokenizer, vocab_size: int) -> list[list[int]]:
    """The 8 probe prompts as token ids (a model without a tokenizer: 8 fixed random prompts)."""
    if tokenizer is not None:
        return [tokenizer(t)["input_ids"] for t in PROBE_TEXTS]
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab_size, (6 + i,), generator=g).tolist() for i in range(len(PROBE_TEXTS))]


def torch_forward(model: nn.Module):
    def forward(ids):
        with torch.no_grad():
            return model(input_ids=ids).logits[0].float()
    return forward


def reference_probe(model: nn.Module, prompts: list[list[int]], new_tokens: int = PROBE_NEW_TOKENS,
                    dense: bool = False, forced_on: list[list[int]] | None = None):
    """The model's greedy continuations of the prompts and its logits predicting each token of
    ``forced_on`` (default: of its own continuations), computed exactly: dequantized weights, float32
    matmuls (kernels "torch"; the CPU decode kernel would round activations and scales to bf16).
    ``dense``: dequantize every layer once into a float32 copy (4 bytes a weight; the same values,
    and much faster than dequantizing at every call). lotaqaf's reference is the merged model's;
    the same probe on another model with ``forced_on`` = the reference's continuations is what an
    engine check measures."""
    if dense:
        model = dequantized_model(model)
    fwd = torch_forward(model)
    previous = kernels.mode()
    kernels.set_mode("torch")
    try:
        conts = greedy_continuations(fwd, prompts, new_tokens)
        return conts, [lg.numpy() for lg in forced_logits(fwd, prompts, forced_on or conts)]
    finally:
        kernels.set_mode(previous)


def compare_probe(ref_conts, ref_logits, greedy, logits) -> dict:
    """Token-for-token agreement of the engine's greedy continuations with lotaqaf's, and the largest
    |logit difference| teacher-forced on lotaqaf's continuations."""
    import numpy as np

    same = [list(a) == list(b) for a, b in zip(ref_conts, greedy, strict=True)]
    first = [next((k for k, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None) for a, b in zip(ref_conts, greedy, strict=True)]
    diff = max(float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
               for a, b in zip(ref_logits, logits, strict=True))
    return {"prompts": len(ref_conts), "new_tokens": len(ref_conts[0]), "same_continuations": int(sum(same)),
            "first_divergence": {str(i): k for i, k in enumerate(first) if k is not None},
            "max_abs_logit_diff": diff}
