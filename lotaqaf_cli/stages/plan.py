"""Stage `plan`: the memory each stage of a recipe needs, before anything is loaded.

    for_config(cfg, stages, device)   -> (Plan, capacity in GB, what the capacity is): the plan of a
                                         command, against plan.device_gb or the device's memory
    make(cfg, model_config, config_source, stages, device_type, streamed, can_stream)
                                      -> Plan (core.plan's figures for this recipe)
    check(plan, capacity_gb, where)   -> None, or the one-line refusal naming what to change
    summary(plan, capacity_gb)        -> the plan as a record (plan.json, memory.json)
    show(plan, capacity_gb, where)       the table `lotaqaf plan` prints

The model's config comes from io.models.model_config (config.json, GGUF metadata or the shapes
shipped for the recipe models); nothing is downloaded beyond it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from omegaconf import DictConfig
from rich.table import Table

from .. import memory, precision, ui
from ..core import plan as core
from ..errors import LotaqafError
from ..io.models import model_config, streamable, streams

MMLU_PROMPT_TOKENS = 1024   # a long 5-shot MMLU prompt (lm-eval's); the eval stage's forward length


@dataclass
class Plan:
    shape: core.Shape
    inputs: core.Inputs
    stages: list[core.Stage]
    config_source: str
    can_stream: bool = False    # the source has safetensors shards (quant.stream=true would work)
    train_other: core.Stage | None = None   # the train stage with gradient checkpointing switched

    @property
    def other_label(self) -> str:
        return f"train, checkpointing {'off' if self.inputs.checkpointing else 'on'}"

    @property
    def peak(self) -> core.Stage:
        return max(self.stages, key=lambda s: s.total)


def inputs(cfg: DictConfig, device_type: str, streamed: bool, max_positions: int) -> core.Inputs:
    """The plan's inputs from the recipe; calibration activations on the device unless quant.activations=host
    (:func:`make` moves them to the host under auto when they do not fit)."""
    q, o, d = cfg.quant, cfg.optim, cfg.data
    source_held = not streamed or cfg.calib.source == "self" or d.source == "self_distill"
    return core.Inputs(
        device=device_type, source_dtype=cfg.model.dtype, streamed=streamed, bits=q.bits, group_size=q.group_size,
        calib_tokens=cfg.calib.n_samples * cfg.calib.seq_len, calib_batch_tokens=q.batch_size * cfg.calib.seq_len,
        adapter=cfg.adapter.kind, rank=len(cfg.adapter.train) if "train" in cfg.adapter else cfg.adapter.rank,
        micro_batch=o.batch_size,
        train_len=d.source_len + d.target_len, checkpointing=bool(o.gradient_checkpointing),
        ppl_tokens=cfg.ppl.batch_size * cfg.ppl.seq_len,
        eval_tokens=cfg.eval.batch_size * min(MMLU_PROMPT_TOKENS, max_positions), source_held=source_held,
        precision=planned_precision(cfg.precision, device_type),
        activations_on_host=device_type == "cuda" and q.activations == "host")


def planned_precision(name: str, device_type: str) -> str:
    """The precision a run on ``device_type`` computes in: auto is bf16 on CUDA (the plan's GPUs all have
    it) and, on CPU, what this machine's CPU gives (precision.resolve)."""
    if name != "auto":
        return name
    return "bf16" if device_type == "cuda" else precision.resolve("auto", torch.device("cpu")).name


def make(cfg: DictConfig, model_config, config_source: str, stages: list[str], device_type: str,
         streamed: bool, can_stream: bool, capacity_gb: float | None = None) -> Plan:
    """The plan of ``stages``. Under quant.activations=auto on CUDA, the calibration activations go to host
    memory when the quantize stage would not fit ``capacity_gb`` with them on the device."""
    shape = core.Shape.from_config(model_config)
    x = inputs(cfg, device_type, streamed, int(getattr(model_config, "max_position_embeddings", 4096) or 4096))
    if device_type == "cuda" and cfg.quant.activations == "auto" and capacity_gb is not None:
        quantize = next(s for s in core.plan(shape, x) if s.name == "quantize")
        x = replace(x, activations_on_host=quantize.total > capacity_gb * core.GB)
    other = next(s for s in core.plan(shape, replace(x, checkpointing=not x.checkpointing)) if s.name == "train")
    return Plan(shape, x, [s for s in core.plan(shape, x) if s.name in stages], config_source, can_stream,
                other if "train" in stages else None)


def for_config(cfg: DictConfig, stages: list[str], device: torch.device) -> tuple[Plan, float | None, str]:
    """(plan of ``stages``, capacity in GB, what the capacity is): plan.device_gb, else the memory of
    ``device``, the device the run uses (CUDA: the GPU's; CPU: the machine's RAM)."""
    named = cfg.plan.device_gb is not None
    device_type = "cpu" if cfg.device == "cpu" or (not named and device.type == "cpu") else "cuda"
    if named:
        cap, where = float(cfg.plan.device_gb), f"plan.device_gb={cfg.plan.device_gb:g}"
    else:
        cap_bytes = memory.capacity_bytes(device)
        cap = None if cap_bytes is None else round(cap_bytes / 1e9, 1)
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "this machine's RAM"
    mc, where_config = model_config(cfg.model.path)
    p = make(cfg, mc, where_config, stages, device_type, streams(cfg.quant.stream, cfg.model.path),
             streamable(cfg.model.path), cap)
    return p, cap, where


def activations_on_host(cfg: DictConfig, device: torch.device) -> bool:
    """Where quantization keeps the calibration activations: quant.activations, or under auto the plan's
    choice for ``device`` (host memory only on CUDA, when they do not fit beside the layer's work)."""
    where = cfg.quant.activations
    if device.type != "cuda" or where == "device":  # on a CPU the device is the host
        return False
    if where == "host":
        return True
    return for_config(cfg, ["quantize"], device)[0].inputs.activations_on_host


def _fix(p: Plan, stage: core.Stage, capacity: float) -> tuple[str, float] | None:
    """The first change to the recipe that brings ``stage`` within ``capacity`` bytes, and its new figure."""
    x = p.inputs
    tries = []
    if stage.name == "quantize" and not x.streamed and p.can_stream:
        tries.append(("quant.stream=true (safetensors sources)", replace(x, streamed=True, source_held=False)))
    if stage.name == "quantize" and x.device == "cuda" and not x.activations_on_host:
        tries.append(("quant.activations=host", replace(x, activations_on_host=True)))
    if stage.name == "train" and not x.checkpointing:
        tries.append(("optim.gradient_checkpointing=true", replace(x, checkpointing=True)))
    if stage.name == "train" and x.micro_batch > 1:
        half = x.micro_batch // 2
        tries.append((f"optim.batch_size={half} with optim.grad_accum doubled (the same global batch)",
                      replace(x, micro_batch=half)))
    if stage.name == "quantize" and x.calib_tokens > x.calib_batch_tokens:
        tries.append(("fewer calibration samples (calib.n_samples)", replace(x, calib_tokens=x.calib_tokens // 2)))
    for what, y in tries:
        new = next(s for s in core.plan(p.shape, y) if s.name == stage.name)
        if new.total <= capacity:
            return what, new.total
    return None


def check(p: Plan, capacity_gb: float, where: str) -> None:
    """Refuse, in one line, the first stage whose figure exceeds ``capacity_gb``."""
    for st in p.stages:
        if st.total > capacity_gb * core.GB:
            fix = _fix(p, st, capacity_gb * core.GB)
            gpu = core.smallest_gpu(p.peak.total)
            hint = (f"set {fix[0]} (then {fix[1] / core.GB:.1f} GB)" if fix else
                    "use a device with more memory" + (f" ({gpu})" if gpu else ""))
            raise LotaqafError(f"the {st.name} stage needs about {st.total / core.GB:.1f} GB, more than the "
                               f"{capacity_gb:g} GB of {where}: {hint}; `lotaqaf plan` shows every stage "
                               "(plan.check=false skips this check)")


def summary(p: Plan, capacity_gb: float | None) -> dict:
    """The plan as a record: GB per stage and term (device and, on CUDA, host memory), the peak, and the
    smallest single GPU."""
    def gb(parts: dict) -> dict:
        return {k: round(v / core.GB, 3) for k, v in parts.items()}

    return {"config": p.config_source, "device": p.inputs.device, "capacity_gb": capacity_gb,
            "params_billion": round(p.shape.params / 1e9, 3),
            "calibration_activations": "host" if p.inputs.activations_on_host else "device",
            "stages": {s.name: {"gb": round(s.total / core.GB, 2), "parts_gb": gb(s.parts),
                                **({"host_gb": round(s.host_total / core.GB, 2), "host_parts_gb": gb(s.host)}
                                   if p.inputs.device == "cuda" else {})}
                       for s in p.stages},
            "peak_gb": round(p.peak.total / core.GB, 2), "smallest_gpu": core.smallest_gpu(p.peak.total),
            **({"train_checkpointing_" + ("off" if p.inputs.checkpointing else "on") + "_gb":
                round(p.train_other.total / core.GB, 2)} if p.train_other else {})}


def show(p: Plan, capacity_gb: float | None, where: str) -> None:
    x = p.inputs
    cuda = x.device == "cuda"
    t = Table(title=f"memory plan ({x.device}; {p.shape.params / 1e9:.2f} B parameters; config: {p.config_source})")
    cols = ["stage", "GPU GB" if cuda else "GB", *(["host GB"] if cuda else []), "largest terms",
            f"fits {capacity_gb:g} GB" if capacity_gb else "fits"]
    for col in cols:
        t.add_column(col, justify="right" if "GB" in col and not col.startswith("fits") else "left")
    for s in p.stages:
        top = sorted({**s.parts, **{f"{k} (host)": v for k, v in s.host.items()}}.items(), key=lambda kv: -kv[1])[:3]
        fits = "-" if capacity_gb is None else ("yes" if s.total <= capacity_gb * core.GB else "[red]no[/red]")
        t.add_row(s.name, f"{s.total / core.GB:.2f}", *([f"{s.host_total / core.GB:.2f}"] if cuda else []),
                  ", ".join(f"{k} {v / core.GB:.2f}" for k, v in top), fits)
    if p.train_other is not None:  # the alternative, not what this recipe runs
        o = p.train_other
        fits = "-" if capacity_gb is None else ("yes" if o.total <= capacity_gb * core.GB else "[red]no[/red]")
        t.add_row(f"[dim]({p.other_label})[/dim]", f"[dim]{o.total / core.GB:.2f}[/dim]", *([""] if cuda else []),
                  "", fits)
    ui.console.print(t)
    gpu = core.smallest_gpu(p.peak.total)
    ui.console.print(f"peak: {p.peak.name} {p.peak.total / core.GB:.1f} GB; smallest single GPU that runs it: "
           f"{gpu or 'none of ' + core.GPUS[-1][0] + ' or smaller'}" + (f"; checked against {where}" if where else ""))
    if cuda and any(s.name == "quantize" for s in p.stages):
        ui.console.print("calibration activations: " + (
            "in pinned host memory, one batch at a time on the GPU" if x.activations_on_host else "on the GPU")
            + " (quant.activations=auto|device|host)")
