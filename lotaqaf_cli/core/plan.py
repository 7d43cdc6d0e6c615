"""The memory plan: bytes each stage of the chain holds at its peak, from the model's shape alone.

Every figure is a sum of named terms (a Stage's ``parts``) that follow what the code holds:

- weights: the source model in its dtype (loaded whole, or one decoder layer when streamed); the
  packed base (bits/8 bytes a weight, padded to whole int32 rows, plus float32 scales and zeros per
  group and the int32 g_idx), and the rest (embeddings, norms, lm_head) in float32 as the quantized
  checkpoint is loaded. A chained run keeps the objects of earlier stages (source, base, adapted
  model, merged model): each stage counts what is resident then.
- quantize: calibration activations (n x seq x hidden, the source dtype; replaced in place layer by
  layer), one layer's forward transients per calibration batch, a Hessian (float32 d_in^2) per linear
  of the layer, GPTQ's working copies of the largest linear.
- train: adapter tensors with their gradients and optimizer state; activations saved for backward
  per token and layer (or, with gradient checkpointing, each layer's input plus one layer
  recomputed); the logits (micro-batch x tokens x vocab, float32), their log-softmax and both
  gradients;
  the dense effective weight LoTA builds for its largest layer.
- ppl / merge / eval: the models held, and one forward's logits and transients (merge scores the
  held-out perplexity of the adapted and merged models for its certificate).
- runtime: the process itself (CPU: interpreter, torch and the libraries; CUDA: the context, which
  the allocator's peak does not count).

No I/O: stages/plan.py reads the config and prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GB = 1e9
# Single GPUs, smallest first (memory in GB as sold): what "the smallest GPU that runs it" picks from.
GPUS = (("24 GB (RTX 4090, L4)", 24), ("40 GB (A100-40GB)", 40), ("48 GB (L40S, RTX 6000 Ada)", 48),
        ("80 GB (A100-80GB, H100)", 80), ("94 GB (H100 NVL)", 94), ("141 GB (H200)", 141),
        ("192 GB (B200, MI300X)", 192))
RUNTIME = {"cpu": 0.55 * GB, "cuda": 0.8 * GB}   # see the module docstring; CPU measured, CUDA typical
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Shape:
    """A Llama/Qwen2 decoder model's sizes (from config.json)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, c) -> Shape:
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
                   getattr(c, "num_key_value_heads", None) or c.num_attention_heads, hd, c.vocab_size,
                   bool(getattr(c, "tie_word_embeddings", False)))

    def linears(self) -> list[tuple[int, int]]:
        """(d_in, d_out) of one decoder layer's q, k, v, o, gate, up, down."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    @property
    def layer_params(self) -> int:
        return sum(a * b for a, b in self.linears()) + 2 * self.hidden

    @property
    def rest_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.rest_params

    def act_elems(self) -> int:
        """Activations one decoder layer saves for backward, per token (elements): norm inputs and
        outputs, q/k/v before and after rotary, attention output, MLP gate/up/activation/product."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return 4 * h + 4 * q + 4 * kv + 4 * i


def packed_bytes(shape: Shape, bits: int, group_size: int) -> int:
    """The packed base's decoder linears: int32 words, float32 scales and zeros per group, g_idx."""
    total = 0
    for d_in, d_out in shape.linears():
        rows = -(-d_in * bits // 32)
        rows = -(-rows // bits) * bits if bits == 3 else rows  # 3-bit rows come in whole periods of 3 words
        groups = 1 if group_size <= 0 else -(-d_in // group_size)
        total += rows * d_out * 4 + 2 * groups * d_out * 4 + d_in * 4
    return shape.layers * total


@dataclass
class Inputs:
    """What the plan needs from a recipe (stages/plan.py fills it from the config)."""

    device: str                 # cpu | cuda
    source_dtype: str           # the source model's dtype (model.dtype)
    streamed: bool              # quantization streams the source (quant.stream)
    bits: int
    group_size: int
    calib_tokens: int           # calib.n_samples x calib.seq_len
    calib_batch_tokens: int     # quant.batch_size x calib.seq_len
    adapter: str                # lota | lora | qalora
    rank: int
    micro_batch: int            # optim.batch_size (sequences per forward/backward)
    train_len: int              # data.source_len + data.target_len
    checkpointing: bool         # optim.gradient_checkpointing
    ppl_tokens: int             # ppl.batch_size x ppl.seq_len
    eval_tokens: int            # eval.batch_size x the longest 5-shot MMLU prompt
    source_held: bool = True    # the chain keeps the 16-bit source loaded (in-memory quantization,
                                # self-generated text or data)
    precision: str = "bf16"     # the activations' dtype after quantization (bf16 | fp32: precision.py)


@dataclass
class Stage:
    name: str
    parts: dict[str, float] = field(default_factory=dict)   # term -> bytes

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def plan(shape: Shape, x: Inputs) -> list[Stage]:
    """The peak of each stage of `lotaqaf train` (quantize, train, ppl, merge, eval), in bytes."""
    sb = DTYPE_BYTES[x.source_dtype]
    act = 2 if x.precision == "bf16" else 4      # activations of train, ppl, merge and eval
    runtime = RUNTIME[x.device]
    source = shape.params * sb
    base = packed_bytes(shape, x.bits, x.group_size) + shape.rest_params * 4
    held_source = source if x.source_held else 0.0
    d_in_max = max(a for a, _ in shape.linears())
    big = max(a * b for a, b in shape.linears())
    logits = shape.vocab * 4

    q = Stage("quantize", {"runtime": runtime})
    if x.streamed:
        q.parts["source: embeddings + one layer"] = shape.rest_params * sb + shape.layer_params * sb
    else:
        q.parts["source + its quantized copy"] = 2 * source
    q.parts["calibration activations"] = x.calib_tokens * shape.hidden * sb
    q.parts["layer forward (one batch)"] = x.calib_batch_tokens * (shape.act_elems() * sb + d_in_max * 4)
    q.parts["Hessians (one layer)"] = sum(a * a * 4 for a, _ in shape.linears())
    q.parts["GPTQ working copies"] = 3 * d_in_max * d_in_max * 4 + 6 * big * 4

    adapter_params = sum(x.rank * (a + b) for a, b in shape.linears()) * shape.layers
    # LoTA: A_T, B_T and their gradients (float32); t-SignSGD keeps no moments. LoRA: + AdamW's two.
    adapter = adapter_params * 4 * (2 if x.adapter == "lota" else 4)
    tokens = x.micro_batch * x.train_len
    t = Stage("train", {"runtime": runtime, "source (held)": held_source, "base + its trainable copy": 2 * base,
                        "adapter, gradients, optimizer": adapter})
    # Attention runs torch's flash kernels (CPU and CUDA, padding masks included): nothing of size len^2.
    if x.checkpointing:
        t.parts["activations (checkpointed)"] = tokens * (shape.hidden * act * shape.layers + shape.act_elems() * act)
    else:
        t.parts["activations"] = tokens * shape.act_elems() * act * shape.layers
    t.parts["logits, log-softmax and their gradients"] = 4 * tokens * logits
    if x.adapter == "lota":
        t.parts["effective weight (largest layer)"] = 3 * big * 4

    forward = x.ppl_tokens * (logits * 2 + shape.act_elems() * act)
    p = Stage("ppl", {"runtime": runtime, "source (held)": held_source, "base + adapted": 2 * base,
                      "adapter, gradients, optimizer": adapter, "forward (one batch)": forward})
    # merge drops the base (the adapted model holds it) and swaps the merged model for the checkpoint
    # read back once it is verified: two models at a time on the device (the file's bytes are host memory).
    m = Stage("merge", {"runtime": runtime, "source (held)": held_source, "adapted + merged": 2 * base,
                        "adapter, gradients, optimizer": adapter, "forward (one batch)": forward})
    if x.device == "cpu":  # the checkpoint's bytes while safetensors writes them, and the packed markers
        m.parts["checkpoint being written"] = base + shape.layers * sum(a * b for a, b in shape.linears()) / 4
    e = Stage("eval", {"runtime": runtime, "source (held)": held_source, "adapted + merged": 2 * base,
                       "adapter, gradients, optimizer": adapter,
                       "forward (one batch)": x.eval_tokens * (logits * 2 + shape.act_elems() * act)})
    return [q, t, p, m, e]


def smallest_gpu(need_bytes: float) -> str | None:
    """The smallest single GPU of :data:`GPUS` whose memory holds ``need_bytes``, else None."""
    for name, gb in GPUS:
        if need_bytes <= gb * GB:
            return name
    return None
