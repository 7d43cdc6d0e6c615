"""The memory plan: bytes each stage of the chain holds at its peak, from the model's shape alone.

Every figure is a sum of named terms (a Stage's ``parts``) that follow what the code holds:

- weights: the source model in its dtype (loaded whole, or one decoder layer when streamed); the
  packed base (bits/8 bytes a weight, padded to whole int32 rows, plus float32 scales and zeros per
  group and the int32 g_idx), and the rest (embeddings, norms, lm_head) in the run's precision (the
  quantized checkpoint's are loaded straight into it). A chained run keeps the objects of earlier
  stages (the source, the one model): each stage counts what is resident then; on CUDA, what lives in
  host memory only (pinned calibration activations, the shard being written) is a Stage's ``host``.
- quantize: calibration activations (n x seq x hidden, the source dtype; replaced in place layer by
  layer; on the device or, quant.activations, in host memory), one layer's forward transients per
  calibration batch, the Hessians (float32 d_in^2) of the linears still to quantize and GPTQ's working
  copies of the one being quantized.
- train: the adapters wrap the one packed base; adapter tensors with their gradients and optimizer
  state; activations saved for backward per token and layer (or, with gradient checkpointing, each
  layer's input plus one layer recomputed); the dequantized weights autograd saves for backward; one
  chunk of the chunked loss's logits (core/loss.py); the dense effective weight LoTA builds for its
  largest layer.
- ppl / merge / eval: the one model (adapters switched off for the GPTQ row; merged in place), one
  forward's logits and transients (merge scores the held-out perplexity of the adapter and merged
  models for its certificate), the 16-bit row's copy in the run's precision, the merge's probe and the
  checkpoint shard being written.
- runtime: the process itself (CPU: interpreter, torch and the libraries; CUDA: the context, which
  the allocator's peak does not count).

No I/O: stages/plan.py reads the config and prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .loss import chunk_tokens

GB = 1e9
# Single GPUs, smallest first (memory in GB as sold): what "the smallest GPU that runs it" picks from.
GPUS = (("24 GB (RTX 4090, L4)", 24), ("40 GB (A100-40GB)", 40), ("48 GB (L40S, RTX 6000 Ada)", 48),
        ("80 GB (A100-80GB, H100)", 80), ("94 GB (H100 NVL)", 94), ("141 GB (H200)", 141),
        ("192 GB (B200, MI300X)", 192))
RUNTIME = {"cpu": 0.55 * GB, "cuda": 0.8 * GB}   # see the module docstring; CPU measured, CUDA typical
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
PROBE_TOKENS = 4 * 64   # the merge certificate's probe batch (core/merge.py PROBE_SHAPE)


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
    adapter: str                # lota | lora | qalora | scales | zeros
    rank: int                   # scales, zeros: the number of trained parameter kinds (1 or 2)
    micro_batch: int            # optim.batch_size (sequences per forward/backward)
    train_len: int              # data.source_len + data.target_len
    checkpointing: bool         # optim.gradient_checkpointing
    ppl_tokens: int             # ppl.batch_size x ppl.seq_len
    eval_tokens: int            # eval.batch_size x the longest 5-shot MMLU prompt
    source_held: bool = True    # the chain keeps the 16-bit source loaded (in-memory quantization,
                                # self-generated text or data)
    precision: str = "bf16"     # the activations' dtype after quantization (bf16 | fp32: precision.py)
    activations_on_host: bool = False  # calibration activations in host memory (quant.activations)


@dataclass
class Stage:
    name: str
    parts: dict[str, float] = field(default_factory=dict)   # term -> bytes on the device
    host: dict[str, float] = field(default_factory=dict)    # term -> bytes in host memory only (CUDA runs)

    @property
    def total(self) -> float:
        """Bytes on the device (on a CPU run: the process's, host terms included)."""
        return sum(self.parts.values())

    @property
    def host_total(self) -> float:
        return sum(self.host.values())


def plan(shape: Shape, x: Inputs) -> list[Stage]:
    """The peak of each stage of `lotaqaf train` (quantize, train, ppl, merge, eval), in bytes."""
    sb = DTYPE_BYTES[x.source_dtype]
    act = 2 if x.precision == "bf16" else 4      # activations of train, ppl, merge and eval
    runtime = RUNTIME[x.device]
    source = shape.params * sb
    # one packed base: the adapted model wraps its layers by reference, and the merge replaces them in place;
    # embeddings, norms and lm_head in the run's precision (Session.place)
    base = packed_bytes(shape, x.bits, x.group_size) + shape.rest_params * act
    held_source = source if x.source_held else 0.0
    d_in_max = max(a for a, _ in shape.linears())
    big = max(a * b for a, b in shape.linears())
    layer_weights = sum(a * b for a, b in shape.linears())
    cpu = x.device == "cpu"

    def stage(name: str, device: dict, host: dict | None = None) -> Stage:
        """On a CPU run the device is the host: host-only terms count in the one total."""
        host = {k: v for k, v in (host or {}).items() if v}
        return Stage(name, {**device, **host}, {}) if cpu else Stage(name, device, host)

    calib = {"calibration activations": x.calib_tokens * shape.hidden * sb}
    q_dev = {"runtime": runtime}
    if x.streamed:
        q_dev["source: embeddings + one layer"] = shape.rest_params * sb + shape.layer_params * sb
    else:  # the source stays 16-bit (the 16-bit perplexity row, self-generated data) beside its quantized copy
        q_dev["source + its quantized copy"] = 2 * source
    q_dev.update({} if x.activations_on_host else calib)
    q_dev["layer forward (one batch)"] = x.calib_batch_tokens * (shape.act_elems() * sb + d_in_max * 4)
    # each linear's Hessian is freed once that linear is quantized (q, k, v, o, gate, up, down in turn);
    # GPTQ's own peak is the Cholesky step (H, its factor and inverse: 3 d_in^2) or the column loop
    # (the inverse factor and W's float32 working copies)
    lins = shape.linears()
    hess = [a * a * 4 for a, _ in lins]
    gptq = [max(3 * a * a + 2 * a * b, a * a + 6 * a * b) * 4 for a, b in lins]
    q_dev["Hessians and GPTQ's working copies"] = max(sum(hess[i:]) + gptq[i] for i in range(len(lins)))
    q = stage("quantize", q_dev, calib if x.activations_on_host else {})

    if x.adapter in ("scales", "zeros"):  # one value per (group, column) for each trained kind
        adapter_params = sum(x.rank * -(-a // (a if x.group_size == -1 else x.group_size)) * b
                             for a, b in shape.linears()) * shape.layers
    else:
        adapter_params = sum(x.rank * (a + b) for a, b in shape.linears()) * shape.layers
    # LoTA: A_T, B_T and their gradients (float32); t-SignSGD keeps no moments. LoRA: + AdamW's two.
    adapter = adapter_params * 4 * (2 if x.adapter == "lota" else 4)
    tokens = x.micro_batch * x.train_len
    t = {"runtime": runtime, "source (held)": held_source, "base (one packed copy)": base,
         "adapter, gradients, optimizer": adapter}
    # Attention runs torch's flash kernels (CPU and CUDA, padding masks included): nothing of size len^2.
    # Each linear's 16-bit dequantized weight is saved for backward (LoRA's base, LoTA's W_eff at 16 bits):
    # every layer's, or with checkpointing the recomputed layer's.
    saved_w = layer_weights * act if (x.adapter != "lota" or act == 2) else 0
    if x.checkpointing:
        t["activations (checkpointed)"] = tokens * (shape.hidden * act * shape.layers + shape.act_elems() * act)
        t["dequantized weights saved for backward"] = saved_w
    else:
        t["activations"] = tokens * shape.act_elems() * act * shape.layers
        t["dequantized weights saved for backward"] = saved_w * shape.layers
    # chunked loss (core/loss.py): one chunk's float32 logits, their softmax and gradient, and the chunk's
    # 16-bit logits; plus the final hidden states and their gradient
    t["loss (one chunk of logits)"] = min(tokens, chunk_tokens(shape.vocab)) * shape.vocab * (3 * 4 + act) \
        + 2 * tokens * shape.hidden * act
    if x.adapter == "lota":
        t["effective weight (largest layer)"] = 3 * big * 4
    t = stage("train", t)

    adapter_kept = adapter_params * 4       # the trained adapters (gradients and optimizer state are gone)
    # core/perplexity: the float32 logits, the shifted copy and its log-softmax (12 bytes a logit; measured
    # 0.65 GB for SmolLM2 at 4 x 256 tokens, activations included)
    forward = x.ppl_tokens * (shape.vocab * 12 + shape.act_elems() * act)
    # the 16-bit row scores the source in the run's precision: a copy when it is held in another dtype
    row16 = shape.params * act if x.source_held and act != sb else 0.0
    p = stage("ppl", {"runtime": runtime, "source (held)": held_source, "base (adapters on and off)": base,
                      "adapters": adapter_kept, "16-bit row's copy in the run's precision": row16,
                      "forward (one batch)": forward})
    # merge (stages/merge.py): in place, decoder layer by decoder layer. Its phases do not overlap: the
    # held-out forwards (before and after), the probe's logits and hidden states with one layer's merge,
    # the shard being written (the embeddings and lm_head shard is the largest; host memory on CUDA).
    probe = PROBE_TOKENS * (shape.vocab * 4 * 2 + shape.hidden * act * shape.layers) + 4 * big
    shard = max(shape.rest_params * act, packed_bytes(shape, x.bits, x.group_size) / shape.layers + layer_weights / 4)
    merge_dev = {"runtime": runtime, "source (held)": held_source, "model (merged in place)": base,
                 "adapters": adapter_kept}
    if cpu:
        merge_dev["largest phase: forward, probe + one layer, or shard written"] = max(forward, probe, shard)
        m = stage("merge", merge_dev)
    else:
        merge_dev["largest phase: forward, or probe + one layer"] = max(forward, probe)
        m = stage("merge", merge_dev, {"shard being written": shard})
    e = stage("eval", {"runtime": runtime, "source (held)": held_source, "merged model": base,
                       "forward (one batch)": x.eval_tokens * (shape.vocab * 4 * 2 + shape.act_elems() * act)})
    return [q, t, p, m, e]


def smallest_gpu(need_bytes: float) -> str | None:
    """The smallest single GPU of :data:`GPUS` whose memory holds ``need_bytes``, else None."""
    for name, gb in GPUS:
        if need_bytes <= gb * GB:
            return name
    return None
