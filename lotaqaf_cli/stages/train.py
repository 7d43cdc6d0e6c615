"""Stage `train`: attach adapters to the quantized base and train them.

    adapter=lota   ternary adapters (core/ternary.py) trained with t-SignSGD (core/tsignsgd.py)
    adapter=lora   16-bit LoRA, AdamW          adapter=qalora   QA-LoRA, AdamW

    train(base, examples, spec, optim, seed, store, *, data_seed, resume=False, pad_id=0,
          tensorboard_dir=None)                          -> (adapted model, summary)
    adapter_metrics(model, opt) / code_change_table(model)  what a step's metrics row and the summary hold

``base`` is the quantized model: the adapters are attached to it in place, wrapping its quantized layers
by reference (one copy of the packed base; io.adapter.without_adapters scores the base again), ``examples`` the
tokenized, prompt-masked training examples, ``spec`` the adapter's layers (io.adapter.adapter_spec
of the recipe's `adapter` section), ``optim`` the recipe's `optim` section, ``data_seed`` the order of
the batches (the recipe's data.seed), ``tensorboard_dir`` where TensorBoard's events go (None: none
written). ``store`` keeps the training state: save_checkpoint(step, state) every optim.save_every
steps, newest_checkpoint() for resume=True, open_metrics(keep_steps) for one metrics row per step
(the run directory is one).
A SIGINT or SIGTERM (interrupts.installed by the CLI) lets the current step finish, saves a
checkpoint and raises interrupts.Interrupted, so that resume=True continues bit for bit.
"""

from __future__ import annotations

import json
import math
import signal
import time

import torch
from omegaconf import DictConfig

from .. import dist, interrupts, ui
from ..core.loss import causal_lm_loss
from ..core.ternary import TernaryLinear
from ..core.tsignsgd import TSignSGD
from ..data.sft import SFTBatches
from ..io.adapter import adapter_layers, adapter_state, attach_adapter, load_adapter_state


def make_optimizer(model, optim: DictConfig):
    params = [p for m in adapter_layers(model).values() for p in m.parameters(recurse=False)]
    if optim.name == "tsignsgd":
        return TSignSGD(params, total_steps=optim.steps, schedule=optim.schedule, tau=optim.tau), None
    opt = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    warmup = max(1, math.ceil(optim.warmup_ratio * optim.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    return opt, sched


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def train(base: torch.nn.Module, examples: list[dict], spec: dict, optim: DictConfig, seed: int, store, *,
          data_seed: int, resume: bool = False, pad_id: int = 0, tensorboard_dir=None):
    """Train the adapters ``spec`` describes, attached to ``base`` in place. Returns (``base`` adapted, in eval mode,
    summary dict: examples, train seconds, and for LoTA-QAF the code-change table)."""
    batches = SFTBatches(examples, optim.batch_size, seed=data_seed, pad_id=pad_id)
    model = base
    model.requires_grad_(False)
    names = attach_adapter(model, spec, seed)
    model.train()
    device = next(model.parameters()).device
    if optim.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        model.enable_input_require_grads()  # frozen embeddings: let gradients reach the adapters
    opt, sched = make_optimizer(model, optim)

    start = 0
    found = store.newest_checkpoint() if resume else None
    if found is not None:
        where, state = found
        load_adapter_state(model, state["adapter"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None and state["scheduler"] is not None:
            sched.load_state_dict(state["scheduler"])
        batches.load_state_dict(state["data"])
        _set_rng_state(state["rng"])
        start = state["step"]
        ui.say(f"resuming from {where} (step {start} of {optim.steps})")

    rank, ranks = dist.rank(), dist.world()
    params = [p for g in opt.param_groups for p in g["params"]]
    ui.say(f"training {spec['kind']} on {len(names)} layers, {optim.steps} steps x batch {optim.batch_size}"
           f" x accum {optim.grad_accum}, {len(examples)} examples"
           + (f", {ranks} ranks ({optim.grad_accum // ranks} micro-batches each per step)" if ranks > 1 else ""))
    tb = tensorboard_writer(tensorboard_dir)
    t_start = time.time()
    with ui.progress_bar(f"train ({spec['kind']})", optim.steps, unit="steps") as adv, \
            store.open_metrics(start) as mf, interrupts.deferred():
        adv(start)
        for step in range(start, optim.steps):
            t0 = time.time()
            loss_sum, n_tok = 0.0, 0
            for i in range(optim.grad_accum):
                b = next(batches)      # every rank walks the whole stream: the data position stays global
                if i % ranks != rank:  # micro-batch i of the step is rank (i mod ranks)'s
                    continue
                b = {k: v.to(device) for k, v in b.items()}
                # in the base's precision (precision.py; the session cast it); the lm_head and the
                # cross-entropy in chunks of tokens (core/loss.py): never the whole micro-batch's logits
                loss = causal_lm_loss(model, b["input_ids"], b["attention_mask"], b["labels"])
                (loss / optim.grad_accum).backward()
                loss_sum += loss.item() / optim.grad_accum
                n_tok += int(b["attention_mask"].sum())
            if ranks > 1:  # the adapters' gradients summed over the ranks: every rank then takes the same step
                dist.all_reduce_sum([p.grad for p in params if p.grad is not None])
                totals = torch.tensor([loss_sum, float(n_tok)], dtype=torch.float64)
                dist.all_reduce_sum([totals])
                loss_sum, n_tok = float(totals[0]), int(totals[1])
            if optim.name == "adamw" and optim.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], optim.max_grad_norm)
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
            adv(1, tokens_per_s=row["tokens_per_s"])
            signum = interrupts.pending()
            if ranks > 1:  # every rank stops after the same step
                flag = torch.tensor([0.0 if signum is None else float(signum)])
                dist.all_reduce_sum([flag])
                signum = signum or (signal.SIGTERM if flag[0] else None)
            if (step + 1) % optim.save_every == 0 or step + 1 == optim.steps or signum is not None:
                store.save_checkpoint(step + 1, {
                    "step": step + 1, "adapter": adapter_state(model), "optimizer": opt.state_dict(),
                    "scheduler": None if sched is None else sched.state_dict(), "data": batches.state_dict(),
                    "rng": _rng_state()})
            if signum is not None:
                raise interrupts.Interrupted(signum, f"interrupted by {signal.Signals(signum).name} after step "
                                                     f"{step + 1} of {optim.steps} (checkpoint saved)")
    if tb is not None:
        tb.close()
    model.eval()
    summary = {"examples": len(examples), "train_s": round(time.time() - t_start, 1), "ranks": ranks}
    if ranks > 1:
        summary["allreduce_bytes_per_step"] = sum(p.numel() * p.element_size() for p in params) + 16
    if spec["kind"] == "lota":
        summary["codes_changed"] = code_change_table(model)
    return model, summary


def tensorboard_writer(path):
    """A TensorBoard SummaryWriter when tensorboard is installed (and a path is given), else None
    (metrics.jsonl has it all)."""
    if path is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))


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
                tot += m.in_features * m.out_features
                nz += int(c["nonzero"])
                blocked += int(c["blocked"])
        out.update(markers_nonzero=nz / tot, blocked=blocked / tot)
    else:
        out["lr"] = opt.param_groups[0]["lr"]
    return out


def code_change_table(model) -> dict:
    """Codes moved up / down / unchanged / blocked by the markers, and the values of the TA
    parameters (+1 / -1 / 0: what the paper's Table 2 counts)."""
    ternary = [m for m in adapter_layers(model).values() if isinstance(m, TernaryLinear)]
    agg = {"plus": 0, "minus": 0, "zero": 0, "blocked": 0, "total": 0}
    ta = {"plus": 0, "minus": 0, "zero": 0}
    for m in ternary:
        s = m.marker_stats()
        for k in agg:
            agg[k] += s[k]
        for p in (m.A_T, m.B_T):
            ta["plus"] += int((p > 0).sum())
            ta["minus"] += int((p < 0).sum())
            ta["zero"] += int((p == 0).sum())
    t = max(agg["total"], 1)
    n_ta = max(sum(ta.values()), 1)
    return {"codes": {**agg, "up_frac": agg["plus"] / t, "down_frac": agg["minus"] / t,
                      "unchanged_frac": agg["zero"] / t},
            "ta_params": {**ta, "total": n_ta, "plus_frac": ta["plus"] / n_ta, "minus_frac": ta["minus"] / n_ta,
                          "zero_frac": ta["zero"] / n_ta}}
