"""Quantize a decoder-only model layer by layer (GPTQ or round-to-nearest).

The inputs of decoder layer k are the outputs of the already-quantized layers 0..k-1, so each
layer's GPTQ sees the errors of the layers before it. Embeddings, norms and lm_head stay in full
precision. No I/O: progress is reported through an optional callback.

The calibration activations between layers (each batch's hidden states and the per-batch arguments
of the decoder layers: position embeddings, masks) stay on the compute device, or with
``activations_on_host`` in host memory, pinned when the device is CUDA (GPTQModel's way: 34 GB for
Llama-3.3-70B on 1024 x 2048 tokens), each batch fetched to the device for its forward pass and its
output sent back. The arithmetic is the same either way, so are the codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .gptq import HessianAccumulator, gptq_quantize, output_error
from .qlinear import QuantLinear, replace_module
from .quant import dequantize, rtn_quantize

# True-sequential order inside a Llama/Qwen2 decoder layer.
SEQUENTIAL_GROUPS = [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


@dataclass
class LayerStat:
    name: str
    kind: str          # q_proj, k_proj, ...
    gptq_error: float  # relative output error on the calibration inputs
    rtn_error: float   # the same for round-to-nearest on the same grid


class _Captured(Exception):
    pass


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError("expected a Llama/Qwen2-style model with model.model.layers")
    return layers


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder layers (full names)."""
    prefix = "model.layers"
    return {f"{prefix}.{n}": m for n, m in decoder_layers(model).named_modules() if isinstance(m, nn.Linear)}


def _map_tensors(obj, fn):
    """``obj`` with ``fn`` applied to every tensor inside it (tuples, lists and dicts are walked)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _host_copy(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """``t`` in host memory (pinned with ``pin``): itself if it is there already, else one copy."""
    if t.device.type == "cpu" and (not pin or t.is_pinned()):
        return t
    return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin).copy_(t)


def _store(batch, device: torch.device, on_host: bool):
    """Where a batch of activations lives between layers: as it is, on ``device``, or with ``on_host``
    in host memory (pinned when ``device`` is CUDA, so that :func:`_fetch` copies it asynchronously)."""
    if not on_host:
        return batch
    pin = device.type == "cuda"
    return _map_tensors(batch, lambda t: _host_copy(t, pin))


def _fetch(batch, device: torch.device):
    """A stored batch on ``device`` for one forward pass (the tensors themselves if they live there)."""
    return _map_tensors(batch, lambda t: t.to(device, non_blocking=True))


def _call_layer(layer, hidden, kwargs):
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def capture_first_layer_inputs(model: nn.Module, batches: list[torch.Tensor], device,
                               activations_on_host: bool = False) -> list[tuple]:
    """Run the embeddings on each batch of token ids and keep (hidden, kwargs) entering layer 0,
    stored by :func:`_store` (in host memory with ``activations_on_host``)."""
    device = torch.device(device)
    layers = decoder_layers(model)
    captured: list[tuple] = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        captured.append(_store((hidden.detach(), kwargs), device, activations_on_host))
        raise _Captured

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def _sequential_groups(linears: dict, true_sequential: bool) -> list[list[str]]:
    if not true_sequential:
        return [list(linears)]
    groups = [[n for n in linears if n.rsplit(".", 1)[-1] in kinds] for kinds in SEQUENTIAL_GROUPS]
    groups = [g for g in groups if g]
    rest = [n for n in linears if not any(n in g for g in groups)]
    return groups + ([rest] if rest else [])


@torch.no_grad()
def quantize_layer(layer: nn.Module, li: int, inputs: list[tuple], *, bits: int, group_size: int,
                   method: str = "gptq", act_order: bool = False, act_group_aware: bool = False,
                   static_groups: bool = False, mse: float = 0.0,
                   true_sequential: bool = False, damp_percent: float = 0.01, block_size: int = 128,
                   device: str | torch.device = "cpu", mine=None, share=None,
                   activations_on_host: bool = False) -> list[LayerStat]:
    """Quantize decoder layer ``li`` in place (every nn.Linear -> QuantLinear) from its calibration
    ``inputs`` [(hidden, kwargs)], then replace each entry of ``inputs`` by the quantized layer's output
    (one batch at a time, so the activations are held once): the next layer's inputs. With
    ``activations_on_host`` the entries live in host memory (:func:`capture_first_layer_inputs`), and
    each batch visits ``device`` only for its forward passes.

    Several processes share the work through ``mine(k)`` (does this process quantize the layer's k-th
    linear?) and ``share(results)`` (every process's {name: result} merged): each linear is
    quantized by one process, from the same inputs as alone, so the codes do not depend on how many
    processes there are."""
    device = torch.device(device)
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    index = {n: k for k, n in enumerate(linears)}
    mine = mine or (lambda k: True)
    stats: list[LayerStat] = []
    for names in _sequential_groups(linears, true_sequential):
        own = [n for n in names if mine(index[n])]
        acc = {n: HessianAccumulator(linears[n].in_features, device) for n in own}
        handles = [linears[n].register_forward_pre_hook(lambda _m, a, n=n, acc=acc: acc[n].add_batch(a[0]))
                   for n in own]
        if own:
            for batch in inputs:
                _call_layer(layer, *_fetch(batch, device))
        for h in handles:
            h.remove()
        results = {}
        for n in own:
            lin = linears[n]
            W, H = lin.weight.data, acc[n].H
            rtn = rtn_quantize(W.t(), bits, group_size)
            rtn_w = dequantize(*[t.to(W.device) for t in (rtn[0], rtn[1], rtn[2], rtn[3])]).t()
            if method == "gptq":
                res = gptq_quantize(W, H, bits, group_size, damp_percent=damp_percent, block_size=block_size,
                                    act_order=act_order, act_group_aware=act_group_aware,
                                    static_groups=static_groups, mse=mse)
                codes, scales, zeros, g_idx = res.codes, res.scales, res.zeros, res.g_idx
            else:
                codes, scales, zeros, g_idx = rtn
            q = QuantLinear.from_quantized(codes, scales, zeros, g_idx, bits, group_size,
                                           None if lin.bias is None else lin.bias.data.float())
            q_w = q.dequantize().t().to(W.device)
            results[n] = (q, LayerStat(f"model.layers.{li}.{n}", n.rsplit(".", 1)[-1],
                                       output_error(W, q_w, H), output_error(W, rtn_w, H)))
            del acc[n], lin, W, H, q_w
        if share is not None:  # plain tensors and numbers travel between processes, not modules
            sent = share({n: ((q.qweight, q.in_features, q.scales, q.zeros, q.g_idx, bits, group_size, q.bias), st)
                          for n, (q, st) in results.items()})
            results = {n: (QuantLinear.from_packed(*packed), st) for n, (packed, st) in sent.items()}
        for n in names:
            q, stat = results[n]
            stats.append(stat)
            replace_module(layer, n, q.to(device))
    for j, (hidden, kw) in enumerate(inputs):  # kw (positions, masks) is the same for every layer
        out = _call_layer(layer, *_fetch((hidden, kw), device))
        inputs[j] = (_store(out, device, activations_on_host), kw)
    return stats


@torch.no_grad()
def quantize_model(model: nn.Module, batches: list[torch.Tensor], *, device: str | torch.device = "cpu",
                   progress=None, activations_on_host: bool = False, **settings) -> list[LayerStat]:
    """Replace every decoder nn.Linear by a QuantLinear, in place. Returns per-layer errors.

    The model must already sit on ``device``; ``batches`` are token-id tensors [b, seq_len];
    ``settings`` are :func:`quantize_layer`'s (bits, group_size, method, act_order, ...).
    ``activations_on_host``: keep the calibration activations in host memory, not on ``device``.
    """
    model.eval()
    device = torch.device(device)
    layers = decoder_layers(model)
    inputs = capture_first_layer_inputs(model, batches, device, activations_on_host)
    stats: list[LayerStat] = []
    for li, layer in enumerate(layers):
        stats += quantize_layer(layer, li, inputs, device=device, activations_on_host=activations_on_host,
                                **settings)
        if progress:
            progress(li + 1, len(layers))
    return stats


@torch.no_grad()
def quantize_streamed(skeleton: nn.Module, batches: list[torch.Tensor], load_layer, emit_layer, *,
                      device: str | torch.device = "cpu", progress=None, activations_on_host: bool = False,
                      **settings) -> list[LayerStat]:
    """The same quantization, one decoder layer resident at a time.

    ``skeleton`` holds the embeddings (and whatever else runs before layer 0) on ``device``; its
    decoder layers may be empty (meta). ``load_layer(i)`` returns decoder layer i with its weights on
    ``device``; ``emit_layer(i, layer)`` receives it quantized (to write it) before it is dropped.
    Layer for layer the arithmetic is :func:`quantize_model`'s, so the codes are the same;
    ``activations_on_host`` as there.
    """
    skeleton.eval()
    device = torch.device(device)
    layers = decoder_layers(skeleton)
    inputs = capture_first_layer_inputs(skeleton, batches, device, activations_on_host)
    stats: list[LayerStat] = []
    for li in range(len(layers)):
        layer = load_layer(li)
        layer.eval()
        stats += quantize_layer(layer, li, inputs, device=device, activations_on_host=activations_on_host,
                                **settings)
        emit_layer(li, layer)
        del layer
        if progress:
            progress(li + 1, len(layers))
    return stats
