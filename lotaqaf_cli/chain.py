"""The chain of `lotaqaf train`: quantize -> train -> ppl -> merge -> eval, as cfg.stages says, in one
Session; each step gets its inputs from the Session, calls its stage (stages/) and writes its record
through the run directory.

    run_chain(cfg, stages)      preflight, then the steps; the run's status.json and memory.json
    preflight(session, stages)  what can be refused before any weights load
    run_step(session, name)     one step (step_quantize ... step_eval): with session.Session, the
                                surface scripts/reproduce.py and ablate.py use, to score models between steps

Under torchrun (dist.py) every rank runs quantize and train (DISTRIBUTED); then the ranks leave the
group and rank 0 runs the rest as one process.
"""

from __future__ import annotations

import contextlib
import copy
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import __version__, dist, memory, precision, ui
from .core.nf4 import nf4_base_info
from .core.quantize_model import decoder_layers
from .data import sft
from .errors import LotaqafError
from .interrupts import Interrupted
from .io.adapter import EXACT_KINDS, adapter_spec, load_adapter, save_adapter, without_adapters
from .io.checkpoint import ShardedWriter, is_checkpoint, save_quantized, sharded_checkpoint
from .io.files import atomic_dir, file_sha256
from .io.models import check_arch, layer_shapes, model_dir, streamable, streams
from .io.rundir import Cache, RunDir, versions
from .io.shards import ShardedSource
from .session import Session, pick_device
from .stages import evaluate, merge, plan, quantize, train

DISTRIBUTED = ("quantize", "train")  # the steps every rank runs under torchrun; the rest run on rank 0 alone


def step_quantize(s: Session) -> None:
    """The quantized base: the source itself when it is a GPTQ checkpoint, else from the cache, else
    quantized now (and cached)."""
    if s.base is not None:
        return
    cfg, q = s.cfg, s.cfg.quant
    src = s.load_source(weights=not streams(q.stream, cfg.model.path))
    if src.quantized:
        ui.say(f"{cfg.model.path} is already a GPTQ checkpoint: skipping quantization")
        s.base, s.base_info = s.place(src.model), src.info
        s.run.write_record("quantize", {"skipped": True, "checkpoint": cfg.model.path,
                                        "content_hash": src.source_hash, "source_hash": src.source_hash})
        return
    if q.method == "nf4":
        _quantize_nf4(s)
        return
    if src.model is not None:
        quantize.check_model(src.model, q)
    t0 = time.time()
    calib, calib_hash = s.windows_for("calib", cfg.calib)
    s.timings["calib_s"] = round(time.time() - t0, 1)
    settings = quantize.settings(q)
    key = Cache.quantized_key(src.source_hash, calib_hash, settings)
    out_dir = s.cache.quantized_dir(key)
    try:
        with ui.status("loading the cached quantized base ...") if is_checkpoint(out_dir) else contextlib.nullcontext():
            cached = s.cache.load_quantized(key, s.precision.dtype)
    except LotaqafError as e:
        ui.say(f"[yellow]cached quantized base is unusable ({e}); quantizing again[/yellow]")
        cached = None
    if cached is not None:
        s.base, _tok, s.base_info = cached
        s.place(s.base)
        ui.say(f"reusing the cached quantized base {out_dir} (same source, settings and calibration)")
        s.run.write_record("quantize", {"cached": True, "checkpoint": str(out_dir), "source_hash": src.source_hash,
                                        "content_hash": s.base_info["content_hash"], "settings": settings})
        return

    t0 = time.time()
    provenance = {"source": cfg.model.path, "source_hash": src.source_hash,
                  "calibration": OmegaConf.to_container(cfg.calib), "calibration_hash": calib_hash,
                  "settings": settings, "lotaqaf_version": __version__, "versions": versions()}
    if src.model is None:  # streamed: layer by layer from the shards, each layer written as it is done
        stats, chash = _quantize_streamed(s, calib, out_dir, provenance)
        dist.barrier()  # rank 0 has renamed the checkpoint into place: every rank may read it
        s.timings["quantize_s"] = round(time.time() - t0, 1)
        s.base_info = {"settings": settings, "provenance": provenance, "content_hash": chash}
        if s.stages[-1:] != ["quantize"]:  # later stages need the base: its packed weights, read back
            with ui.status("loading the quantized base (packed) ..."):
                s.base, _tok, s.base_info = s.cache.load_quantized(key, s.precision.dtype)
            s.place(s.base)
    else:
        s.base, stats = quantize.quantize(src.model, calib, q, pick_device(cfg), split=_linear_split(),
                                          activations_on_host=plan.activations_on_host(cfg, pick_device(cfg)))
        s.timings["quantize_s"] = round(time.time() - t0, 1)
        with ui.status("writing the quantized checkpoint ..."):
            chash = dist.from_main(lambda: save_quantized(s.base, src.tokenizer, out_dir, settings, provenance))
        s.base_info = {"settings": settings, "provenance": provenance, "content_hash": chash}
        s.place(s.base)  # quantized and written in the source's dtype; from here on in the run's precision
    per_kind = quantize.summarize(stats)
    quantize.show_table(per_kind)
    s.run.write_record("quantize", {
        "cached": False, "checkpoint": str(out_dir), "content_hash": chash, "source_hash": src.source_hash,
        "settings": settings, "calibration_hash": calib_hash, "timings": dict(s.timings),
        "streamed": src.model is None, "error_by_kind": per_kind, "layers": [st.__dict__ for st in stats]})
    ui.say(f"quantized base written to {out_dir} in {s.timings['quantize_s']} s")


def _quantize_nf4(s: Session) -> None:
    """quant=nf4: QLoRA's base, a copy of the source with its targeted linears in NF4 (seconds; rebuilt when a
    run is loaded again, never cached)."""
    cfg = s.cfg
    src = s.load_source(weights=True)
    t0 = time.time()
    base = copy.deepcopy(src.model)  # the source stays 16-bit (the 16-bit row)
    names = quantize.quantize_nf4(base, cfg.quant, cfg.model.target_modules, s.precision.dtype)
    s.base, s.base_info = s.place(base), nf4_base_info(src.source_hash, cfg.quant.group_size)
    s.timings["quantize_s"] = round(time.time() - t0, 1)
    s.run.write_record("quantize", {"cached": False, "nf4": True, "content_hash": s.base_info["content_hash"],
                                    "source_hash": src.source_hash, "settings": s.base_info["settings"],
                                    "layers": len(names), "timings": dict(s.timings)})
    ui.say(f"NF4 base (double quantization, blocks of {cfg.quant.group_size}): {len(names)} layers in "
           f"{s.timings['quantize_s']} s")


def _quantize_streamed(s: Session, calib: torch.Tensor, out_dir: Path, provenance: dict) -> tuple[list, str]:
    """Streamed quantization into ``out_dir``: the source's shards read one decoder layer at a time,
    each quantized layer written as its own shard; returns (per-layer stats, content hash)."""
    cfg, device, dtype = s.cfg, pick_device(s.cfg), getattr(torch, s.cfg.model.dtype)
    source = ShardedSource(model_dir(cfg.model.path))
    with ui.status("reading the embeddings and the config ..."):
        skeleton = source.skeleton(dtype, device)
    check_arch(skeleton, cfg.model.path)
    quantize.check_model(skeleton, cfg.quant)

    def emit(i: int, layer: torch.nn.Module) -> None:
        if dist.main():  # every rank holds the quantized layer; rank 0 writes it
            writer.add_layer(i, layer)
        memory.trim_heap()

    with sharded_checkpoint(out_dir, source.num_layers) if dist.main() else contextlib.nullcontext() as writer:
        stats = quantize.quantize_streamed(skeleton, lambda i: source.layer(i, skeleton, dtype, device), emit,
                                           calib, cfg.quant, device, split=_linear_split(),
                                           activations_on_host=plan.activations_on_host(cfg, device))
        chash = writer.finish(skeleton, s.tokenizer, quantize.settings(cfg.quant), provenance) if dist.main() else None
    return stats, dist.broadcast(chash)


def _linear_split():
    """(mine, share) for quantization over several ranks: rank r quantizes the linears k of each layer with
    k mod ranks == r, and every rank receives all of them; None alone."""
    if not dist.active():
        return None

    def share(results: dict) -> dict:
        merged = {}
        for part in dist.gather(results):
            merged.update(part)
        return merged

    return (lambda k: k % dist.world() == dist.rank()), share


def step_train(s: Session) -> None:
    cfg, a = s.cfg, s.cfg.adapter
    step_quantize(s)
    examples = s.examples()
    tok = s.tokenizer
    if a.kind == "lota":
        extra = {"rank": a.rank, "omega": a.omega, "offset_granularity": a.offset_granularity, "markers": a.markers}
    elif a.kind in ("scales", "zeros"):
        extra = {"train": list(a.train)}
    else:
        extra = {"rank": a.rank, "alpha": a.alpha, "dropout": a.dropout}
    spec = adapter_spec(a.kind, cfg.model.target_modules, **extra)
    s.run.ensure()
    s.adapted, summary = train.train(s.base, examples, spec, cfg.optim, cfg.seed, s.run, data_seed=cfg.data.seed,
                                     resume=cfg.resume, pad_id=sft.pad_token_id(tok) if tok is not None else 0,
                                     tensorboard_dir=s.run.tensorboard_dir if dist.main() else None)
    s.base = None  # the adapters were attached to it in place: the GPTQ row is scored without them (step_ppl)
    s.timings["train_s"] = summary.pop("train_s")
    s.adapter_header = {**spec, "base_hash": s.base_info["content_hash"], "steps": cfg.optim.steps, "seed": cfg.seed}
    if dist.main():
        save_adapter(s.adapted, s.run.adapter_file, s.adapter_header)
    s.run.write_record("train", {"adapter": s.adapter_header, "precision": s.precision.name,
                                 "timings": dict(s.timings), **summary})
    ui.say(f"adapter written to {s.run.adapter_file} ({s.timings['train_s']} s of training)")


def step_ppl(s: Session) -> None:
    cfg = s.cfg
    src = s.load_source(weights=False)
    windows, digest = s.windows_for("heldout", cfg.ppl)
    # the 16-bit source in the run's precision (a cast copy when it is held in another dtype: quantization
    # may read it again)
    models = {} if src.quantized or src.model is None else {"16-bit": precision.cast_copy(src.model, s.precision.dtype)}
    if src.model is None:
        ui.say("16-bit perplexity: skipped (the source was streamed, not loaded; "
               "`lotaqaf eval --tasks ppl --model 16bit` loads it whole)")
    gptq = f"NF4 (blocks of {cfg.quant.group_size})" if cfg.quant.method == "nf4" else \
        f"GPTQ INT{cfg.quant.bits} g{cfg.quant.group_size}"
    if s.base is not None:
        models[gptq] = s.base
    results = {}
    if s.adapted is not None:  # the adapters wrap the base's layers: the base is the same model without them
        with without_adapters(s.adapted) as base:
            results = evaluate.perplexities({**models, gptq: base}, windows, cfg.ppl.batch_size)
        models = {f"{gptq.split()[0]} + {cfg.adapter.kind} (adapter)": s.adapted}
    results.update(evaluate.perplexities(models, windows, cfg.ppl.batch_size))
    s.run.write_record("ppl", {"heldout_hash": digest, "n_samples": windows.shape[0], "seq_len": windows.shape[1],
                               "source": cfg.ppl.source, "results": results})
    evaluate.show_perplexities(results, windows, cfg.ppl.source)


def step_merge(s: Session) -> None:
    """Merge the adapter (in memory when this session trained it), write merged/ and the certificate."""
    run = s.run
    if run.has_merged():
        ui.say("merged model already present: skipped")
        return
    if is_checkpoint(run.merged_dir):
        raise LotaqafError(f"{run.merged_dir} already exists: remove it to merge again")
    if s.adapted is None:
        if s.base is not None:  # the chain without a train stage: the adapter file onto the base in memory
            s.adapted, s.base = s.base, None
            s.adapter_header = load_adapter(s.adapted, run.adapter_file, s.base_info["content_hash"])
            s.adapted.eval()
        else:
            with ui.status(f"loading {run.path} ..."):
                s.adapted, s.tokenizer, s.adapter_header, s.base_info = run.load_adapted(_load_dtype(s))
            s.place(s.adapted)
    kind = s.adapter_header["kind"]
    s.base = None  # the adapted model wraps the base's layers; the merge replaces them in place (core/plan.py)
    memory.trim_heap()
    t0 = time.time()
    settings = s.base_info["settings"]
    adapter_sha = "sha256:" + file_sha256(run.adapter_file)
    prov = {**s.base_info.get("provenance", {}), "merged_from": {"base": s.base_info["content_hash"],
                                                                "adapter": adapter_sha, "kind": kind}}
    model = s.adapted
    if settings.get("method") == "nf4":  # QLoRA: measured only; what deploys is the NF4 base + the LoRA
        _, cert = merge.merge(model, kind, s.heldout())
        cert.update(base_hash=s.base_info["content_hash"], adapter_sha256=adapter_sha, written=False,
                    seconds=round(time.time() - t0, 1))
        path = run.write_record("merge_certificate", cert)
        ui.say(f"QLoRA: the merge back into NF4 is lossy and is not written (max |logit diff| = "
               f"{cert['max_abs_logit_diff']:g}); the deployable model is the NF4 base + {run.adapter_file.name}. "
               f"Certificate: {path}")
        return
    n_layers = len(decoder_layers(model))
    with atomic_dir(run.merged_dir) as tmp:
        writer = ShardedWriter(tmp, n_layers)

        def read_layer(i: int) -> dict:
            return writer.read_layer(i, settings["bits"], settings["group_size"])

        with ui.progress_bar(f"merge ({kind})", n_layers, unit="layers") as adv:
            def write_layer(i: int, layer: torch.nn.Module, merged: dict) -> None:
                writer.add_layer(i, layer, merged)
                memory.trim_heap()  # a layer's freed buffers (codes, markers) back to the system: 0.27 GB on
                adv(1)              # SmolLM2's 30 layers otherwise stays resident (glibc keeps them)

            layers, cert = merge.merge(model, kind, s.heldout(), write_layer=write_layer,
                                       read_layer=read_layer if s.cfg.merge.verify else None)
        with ui.status("writing the embeddings, the head and the configs ..."):
            cert["merged_hash"] = writer.finish(model, s.tokenizer, settings, prov)
    cert.update(base_hash=s.base_info["content_hash"], adapter_sha256=adapter_sha)
    if kind in EXACT_KINDS:  # the model in memory is the merged one now (the adapter file holds the adapters)
        s.merged, s.adapted = model, None
    cert["seconds"] = round(time.time() - t0, 1)
    path = run.write_record("merge_certificate", cert)
    ui.say(f"merged {kind} adapter into {run.merged_dir}, layer by layer: max |layer output diff| = "
           f"{cert['max_abs_layer_diff']:g}"
           + (f" (from disk: {cert['max_abs_layer_diff_from_disk']:g})" if s.cfg.merge.verify else "")
           + f", max |logit diff| = {cert['max_abs_logit_diff']:g}"
           + (f", {cert['codes']['changed_frac']:.3g} of codes changed" if layers else ""))
    if "perplexity" in cert:
        p = cert["perplexity"]
        ui.say(f"held-out perplexity: adapter {p['adapter']:.4f}, merged {p['merged']:.4f}")
    ui.say(f"certificate: {path}")


def _load_dtype(s: Session) -> torch.dtype:
    """The dtype a run's checkpoint loads in: the run's precision, resolved without saying it yet (a load
    that fails, e.g. on a corrupted adapter, leaves the run directory as it was)."""
    return precision.resolve(s.cfg.precision, pick_device(s.cfg)).dtype


def step_eval(s: Session) -> None:
    """The recipe's eval tasks on the merged model of an exact kind (LoTA-QAF, scales, zeros) or, for the
    LoRA baselines, whose merge is lossy, on the adapter model."""
    cfg = s.cfg
    if s.merged is None and s.adapted is None:  # a process that starts at eval: the run's models from disk
        with ui.status(f"loading {s.run.path} ..."):
            if cfg.adapter.kind in EXACT_KINDS and is_checkpoint(s.run.merged_dir):
                s.merged, s.tokenizer, s.base_info = s.run.load_merged(_load_dtype(s))
            else:
                s.adapted, s.tokenizer, s.adapter_header, s.base_info = s.run.load_adapted(_load_dtype(s))
        s.place(s.merged if s.merged is not None else s.adapted)
    tasks = [t for t in cfg.eval.tasks if t != "mmlu" or s.tokenizer is not None]
    if not tasks:
        ui.say("eval: this model has no tokenizer: MMLU skipped")
        return
    exact = cfg.adapter.kind in EXACT_KINDS and s.merged is not None
    model, label = (s.merged, "merged") if exact else (s.adapted, "adapter")
    write_eval(s.run, evaluate.evaluate(model, s.tokenizer, cfg.eval, label, s.heldout() if "ppl" in tasks else None,
                                        tasks=tasks))


def write_eval(run: RunDir, out: dict) -> None:
    label = out["model"]
    md = out.pop("mmlu_markdown", None)
    path = run.write_record(f"eval-{label}", {"run": str(run.path), **out})
    if md is not None:
        run.write_text(f"eval-{label}.md", md)
    ui.say(f"results: {path}")


STEPS = {"quantize": step_quantize, "train": step_train, "ppl": step_ppl, "merge": step_merge, "eval": step_eval}


def run_step(s: Session, name: str) -> None:
    """One step of the chain (a name of config.STAGES) on the Session's objects."""
    STEPS[name](s)


def run_chain(cfg: DictConfig, stages: list[str]) -> None:
    """The steps of `lotaqaf train` (cfg.stages) or `lotaqaf quantize` in one Session and one run directory:
    status.json says done | failed | interrupted, memory.json each step's measured peak beside the plan."""
    if dist.active() and not dist.main():  # quantize and train run on every rank; what follows, on rank 0
        stages = [st for st in stages if st in DISTRIBUTED]
    run = RunDir(dist.from_main(lambda: str(RunDir.for_config(cfg).path)), cfg)  # rank 0 names it
    s = Session(cfg, run, stages=stages)
    dist.from_main(lambda: preflight(s, stages))
    name = stages[0] if stages else None
    device, peaks, starts = pick_device(cfg), {}, {}
    try:
        for name in stages:
            if dist.active() and name not in DISTRIBUTED:  # the group's work is done (the other ranks' loop
                dist.leave()                               # ended): rank 0 runs the rest as one process
            ui.say(f"[bold]== {name} ==[/bold]")
            memory.trim_heap()
            memory.reset_peak(device)
            start = memory.current_bytes(device)
            run_step(s, name)
            peak = memory.peak_bytes(device)
            if peak is not None:
                peaks[name] = round(peak / 1e9, 3)
                starts[name] = None if start is None else round(start / 1e9, 3)
                s.run.log(f"stage {name} done (peak {'GPU' if device.type == 'cuda' else 'resident'} memory "
                          f"{peaks[name]} GB; {starts[name]} GB held when it began)")
            else:
                s.run.log(f"stage {name} done")
        dist.leave()
        if dist.left():  # a rank other than 0: rank 0 reports and marks the run
            return
    except Interrupted as e:
        s.run.mark("interrupted", stage=name, reason=str(e))
        again = f"resume=true run.dir={s.run.path}" if s.run.path.is_dir() else ""
        raise Interrupted(e.signum, f"{e}; to continue, run the same command with {again}" if again else str(e)) \
            from None
    except Exception as e:
        s.run.mark("failed", stage=name, error=str(e) or type(e).__name__)
        raise
    s.run.mark("done", stages=stages)
    if peaks:
        s.run.write_record("memory", {"device": str(device), "measured": "torch.cuda.max_memory_reserved"
                                      if device.type == "cuda" else "peak resident set (VmHWM) of the process",
                                      "peak_gb": peaks, "start_gb": starts, "plan": s.plan})
    ui.say(f"run directory: {s.run.path}")


def preflight(s: Session, stages: list[str]) -> None:
    """What can be checked before the model's weights load: the quantizer settings against the
    model's layer shapes (from its config alone), training data read from a file or the hub, and the
    memory plan against the device (plan.check)."""
    cfg = s.cfg
    if cfg.quant.stream is True and "quantize" in stages and not streamable(cfg.model.path):
        raise LotaqafError(f"quant.stream=true needs safetensors weights (a Hugging Face directory or hub id); "
                           f"{cfg.model.path} is not: use quant.stream=auto")
    if "quantize" in stages or "train" in stages:
        shapes = layer_shapes(cfg.model.path)
        if shapes is not None:
            quantize.check_shapes(shapes, cfg.quant)
    if "train" in stages:
        s.records()
    if cfg.plan.check:
        p, cap, where = plan.for_config(cfg, stages, pick_device(cfg))
        if cap is not None:
            plan.check(p, cap, where)
        s.plan = plan.summary(p, cap)
