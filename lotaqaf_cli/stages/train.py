"""Stage `train`: attach adapters to the quantized base and train them.

    adapter=lota   ternary adapters (core/ternary.py) trained with t-SignSGD (core/tsignsgd.py)
    adapter=lora   16-bit LoRA, AdamW          adapter=qalora   QA-LoRA, AdamW

Reads: the quantized base (quantize stage), training data (data.*).
Writes: <run>/checkpoints/step_NNNNNN/ (every optim.save_every steps, atomically: adapter tensors,
optimizer state, data position, RNG states), <run>/metrics.jsonl, <run>/adapter.safetensors,
<run>/train.json. `run.resume=true` continues from the newest complete checkpoint.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from pathlib import Path

import torch

from .. import ui
from ..core.lora import attach_lora
from ..core.ternary import TernaryLinear, attach_ternary_adapters, check_hparams
from ..core.tsignsgd import TSignSGD
from ..data import sft
from ..errors import LotaqafError
from ..io.adapter import adapter_layers, adapter_state, load_adapter_state, save_adapter
from ..io.checkpoint import atomic_dir, write_json_atomic, write_text_atomic
from ..io.rundir import cache_key
from .common import Context, load_source

DATA_VERSION = "sft-v1"


# ---------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------

def check_adapter_config(cfg) -> None:
    a, o = cfg.adapter, cfg.optim
    if a.name not in ("lota", "lora", "qalora"):
        raise LotaqafError(f"unknown adapter '{a.name}'; valid: lota, lora, qalora")
    if o.name not in ("tsignsgd", "adamw"):
        raise LotaqafError(f"unknown optimizer '{o.name}'; valid: tsignsgd, adamw")
    if a.name == "lota":
        try:
            check_hparams(a.rank, a.omega, a.offset_factor)
        except ValueError as e:
            raise LotaqafError(f"adapter: {e}") from None
        if o.name != "tsignsgd":
            raise LotaqafError("adapter=lota trains with optim=tsignsgd (ternary weights have no learning rate)")
    else:
        if a.rank < 1:
            raise LotaqafError(f"adapter.rank must be >= 1, got {a.rank}")
        if o.name != "adamw":
            raise LotaqafError(f"adapter={a.name} trains with optim=adamw")
    if o.steps < 1 or o.batch_size < 1 or o.grad_accum < 1:
        raise LotaqafError("optim.steps, optim.batch_size and optim.grad_accum must be >= 1")


def attach(model, cfg) -> list[str]:
    a = cfg.adapter
    targets = list(cfg.model.target_modules)
    if a.name == "lota":
        g = torch.Generator().manual_seed(cfg.seed)
        names = attach_ternary_adapters(model, a.rank, a.omega, a.offset_factor, targets, generator=g)
    else:
        torch.manual_seed(cfg.seed)
        names = attach_lora(model, a.name, a.rank, a.alpha, a.dropout, targets)
    if not names:
        raise LotaqafError(f"no quantized layer matches model.target_modules={targets}")
    return names


def make_optimizer(model, cfg):
    o = cfg.optim
    params = [p for m in adapter_layers(model).values() for p in m.parameters(recurse=False)]
    if o.name == "tsignsgd":
        return TSignSGD(params, total_steps=o.steps, schedule=o.schedule, tau=o.tau), None
    opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    warmup = max(1, math.ceil(o.warmup_ratio * o.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    return opt, sched


def training_examples(ctx: Context) -> list[dict]:
    """Tokenized, prompt-masked examples; self-distilled data is generated once and cached."""
    d = ctx.cfg.data
    src = load_source(ctx)
    tok = src.tokenizer
    if d.source == "self_distill":
        key = cache_key(DATA_VERSION, src.source_hash, d.n_samples, d.target_len, d.seed)
        path = ctx.run.cache_path("sft", key, ".json")
        if path.is_file():
            records = json.loads(path.read_text())
            ui.say(f"training data: reusing {len(records)} self-distilled examples ({path})")
        else:
            with ui.progress_bar("self-distilling training answers from the 16-bit model", d.n_samples) as adv:
                records = sft.self_distill_records(src.model, tok, d.n_samples, d.target_len, d.seed, progress=adv)
            write_json_atomic(path, records)
            ui.say(f"training data: {len(records)} self-distilled examples cached at {path}")
    else:
        records = sft.load_records(d.source, d.path, d.n_samples, d.seed)
    examples = []
    for r in records:
        if "prompt_ids" in r:
            examples.append(sft.tokenize_ids(r["prompt_ids"], r["answer_ids"], d.source_len, d.target_len))
        else:
            examples.append(sft.tokenize_example(tok, sft.to_messages(r), d.source_len, d.target_len))
    return examples


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------

def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(run_path: Path, step: int, model, opt, sched, batches) -> None:
    final = run_path / "checkpoints" / f"step_{step:06d}"
    with atomic_dir(final) as tmp:
        torch.save({"step": step, "adapter": adapter_state(model), "optimizer": opt.state_dict(),
                    "scheduler": None if sched is None else sched.state_dict(),
                    "data": batches.state_dict(), "rng": _rng_state()}, tmp / "state.pt")
    for old in sorted((run_path / "checkpoints").glob("step_*"))[:-2]:  # keep the newest two
        shutil.rmtree(old, ignore_errors=True)


def newest_checkpoint(run_path: Path) -> Path | None:
    done = sorted(p for p in (run_path / "checkpoints").glob("step_*") if (p / "state.pt").is_file())
    return done[-1] if done else None


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------

def run(ctx: Context) -> None:
    cfg, o = ctx.cfg, ctx.cfg.optim
    check_adapter_config(cfg)
    if ctx.quantized is None:
        from . import quantize

        quantize.run(ctx)
    examples = training_examples(ctx)
    tok = ctx.source.tokenizer if ctx.source else None
    pad_id = sft.pad_token_id(tok) if tok is not None else 0
    batches = sft.SFTBatches(examples, o.batch_size, seed=cfg.data.seed, pad_id=pad_id)

    model = copy.deepcopy(ctx.quantized)
    model.requires_grad_(False)
    names = attach(model, cfg)
    model.train()
    device = next(model.parameters()).device
    if o.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        model.enable_input_require_grads()  # frozen embeddings: let gradients reach the adapters
    opt, sched = make_optimizer(model, cfg)

    run_path = ctx.run.ensure()
    start = 0
    if cfg.resume:
        ck = newest_checkpoint(run_path)
        if ck is not None:
            state = torch.load(ck / "state.pt", weights_only=False)
            load_adapter_state(model, state["adapter"])
            opt.load_state_dict(state["optimizer"])
            if sched is not None and state["scheduler"] is not None:
                sched.load_state_dict(state["scheduler"])
            batches.load_state_dict(state["data"])
            _set_rng_state(state["rng"])
            start = state["step"]
            ui.say(f"resuming from {ck} (step {start} of {o.steps})")
    metrics_path = run_path / "metrics.jsonl"
    if metrics_path.exists():  # drop rows of steps that the checkpoint does not hold (they are redone)
        rows = [ln for ln in metrics_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= start]
        write_text_atomic(metrics_path, "".join(r + "\n" for r in rows))

    ui.say(f"training {cfg.adapter.name} on {len(names)} layers, {o.steps} steps x batch {o.batch_size}"
           f" x accum {o.grad_accum}, {len(examples)} examples")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null()
    tb = tensorboard_writer(run_path / "tensorboard")
    t_start = time.time()
    with ui.progress_bar(f"train ({cfg.adapter.name})", o.steps) as adv, open(metrics_path, "a") as mf:
        adv(start)
        for step in range(start, o.steps):
            t0 = time.time()
            loss_sum, n_tok = 0.0, 0
            for _ in range(o.grad_accum):
                b = {k: v.to(device) for k, v in next(batches).items()}
                with autocast:
                    loss = model(**b).loss
                (loss / o.grad_accum).backward()
                loss_sum += loss.item() / o.grad_accum
                n_tok += int(b["attention_mask"].sum())
            if o.name == "adamw" and o.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], o.max_grad_norm)
            opt.step()
            if sched is not None:
                sched.step()
            opt.zero_grad(set_to_none=True)
            row = {"step": step + 1, "loss": round(loss_sum, 6), "tokens_per_s": round(n_tok / (time.time() - t0), 1)}
            row.update(adapter_metrics(model, opt))
            mf.write(json.dumps(row) + "\n")
            mf.flush()
            if tb is not None:
                for k, v in row.items():
                    if isinstance(v, (int, float)) and k != "step" and v is not None:
                        tb.add_scalar(f"train/{k}", v, row["step"])
            adv(1)
            if (step + 1) % o.save_every == 0 or step + 1 == o.steps:
                save_checkpoint(run_path, step + 1, model, opt, sched, batches)
    ctx.timings["train_s"] = round(time.time() - t_start, 1)
    if tb is not None:
        tb.close()

    model.eval()
    header = {"kind": cfg.adapter.name, "rank": cfg.adapter.rank, "base_hash": ctx.quantized_hash,
              "target_modules": list(cfg.model.target_modules), "steps": o.steps, "seed": cfg.seed}
    if cfg.adapter.name == "lota":
        header.update(omega=cfg.adapter.omega, offset_factor=cfg.adapter.offset_factor)
    else:
        header.update(alpha=cfg.adapter.alpha)
    save_adapter(model, run_path / "adapter.safetensors", header)
    summary = {"adapter": header, "timings": dict(ctx.timings), "examples": len(examples)}
    if cfg.adapter.name == "lota":
        summary["codes_changed"] = code_change_table(model)
    ctx.run.write_json("train.json", summary)
    ctx.adapted = model
    ui.say(f"adapter written to {run_path / 'adapter.safetensors'} ({ctx.timings['train_s']} s of training)")


def tensorboard_writer(path: Path):
    """A TensorBoard SummaryWriter when tensorboard is installed, else None (metrics.jsonl has it all)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def adapter_metrics(model, opt) -> dict:
    out = {}
    if isinstance(opt, TSignSGD):
        st = opt.last_stats
        sig = list(st.get("sigma", {}).values())
        out.update(keep_fraction=st.get("keep_fraction"), sigma_mean=sum(sig) / len(sig) if sig else None,
                   moved=st.get("moved_total"), guard=st.get("guard"))
        tot = nz = blocked = 0
        for m in adapter_layers(model).values():
            if isinstance(m, TernaryLinear):  # markers as used in this step's forward pass
                c = m.last_marker_counts
                if c is None:
                    st = m.marker_stats()
                    c = {"nonzero": st["plus"] + st["minus"], "blocked": st["blocked"]}
                tot += m.base.codes.numel()
                nz += int(c["nonzero"])
                blocked += int(c["blocked"])
        out.update(markers_nonzero=nz / tot, blocked=blocked / tot)
    else:
        out["lr"] = opt.param_groups[0]["lr"]
    return out


def code_change_table(model) -> dict:
    """Codes moved up / down / unchanged / blocked by the markers, and the values of the TA
    parameters (+1 / -1 / 0: what the paper's Table 2 counts)."""
    agg = {"plus": 0, "minus": 0, "zero": 0, "blocked": 0, "total": 0}
    for m in adapter_layers(model).values():
        if isinstance(m, TernaryLinear):
            s = m.marker_stats()
            for k in agg:
                agg[k] += s[k]
    t = max(agg["total"], 1)
    ta = {"plus": 0, "minus": 0, "zero": 0}  # the TA parameters themselves (the paper's Table 2)
    for m in adapter_layers(model).values():
        if isinstance(m, TernaryLinear):
            for p in (m.A_T, m.B_T):
                ta["plus"] += int((p > 0).sum())
                ta["minus"] += int((p < 0).sum())
                ta["zero"] += int((p == 0).sum())
    n_ta = max(sum(ta.values()), 1)
    return {"codes": {**agg, "up_frac": agg["plus"] / t, "down_frac": agg["minus"] / t,
                      "unchanged_frac": agg["zero"] / t},
            "ta_params": {**ta, "total": n_ta, "plus_frac": ta["plus"] / n_ta, "minus_frac": ta["minus"] / n_ta,
                          "zero_frac": ta["zero"] / n_ta}}
