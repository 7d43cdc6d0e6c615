"""The command layer's runner: disk <-> objects at the edges, stage functions in between.

    lotaqaf train     quantize -> train -> ppl -> merge -> eval, as cfg.stages says, in one Session
    lotaqaf quantize  the quantize step alone
    lotaqaf merge     a run's adapter merged (or, merge.unmerge, its merged checkpoint unmerged)
    lotaqaf eval      one model of a run (or a model path) on cfg.eval.tasks
    lotaqaf export    a run's merged model in cfg.export.format

A Session holds what one invocation has in memory (source model, quantized base, adapted and merged
models, text windows), so a chained run loads its base at most once and hands objects from stage to
stage. Run files are named only by io/rundir.py; stages get their own config section.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import lotaqaf_kernels as kernels
import torch
from omegaconf import DictConfig, OmegaConf

from . import __version__, dist, memory, ui
from .config import writable_dir
from .core.qlinear import quantized_modules
from .data import selfgen, sft, shipped, textfile
from .errors import LotaqafError
from .interrupts import Interrupted
from .io.adapter import adapter_spec, load_adapter, save_adapter
from .io.checkpoint import (
    is_checkpoint,
    load_quantized,
    quantized_tensor_hash,
    save_quantized,
    sharded_checkpoint,
)
from .io.files import atomic_dir, file_sha256
from .io.models import LoadedModel, layer_shapes, load_model, streamable
from .io.rundir import NEEDS, Cache, RunDir, find_run, versions
from .stages import evaluate, export, merge, quantize, train

RUN_MODELS = ("16bit", "gptq", "adapter", "merged")


def streams(cfg: DictConfig) -> bool:
    """Quantization reads the source layer by layer (quant.stream; auto: safetensors sources)."""
    return cfg.quant.stream is True or (cfg.quant.stream == "auto" and streamable(cfg.model.path))


def pick_device(cfg: DictConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise LotaqafError("device=cuda but no CUDA device is available (use device=cpu or device=auto)")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


@dataclass
class Session:
    """The objects one invocation holds, made once and handed from stage to stage."""

    cfg: DictConfig
    run: RunDir
    source: LoadedModel | None = None
    base: torch.nn.Module | None = None      # the quantized base
    base_info: dict | None = None            # its settings, provenance and content hash
    tokenizer: object | None = None
    adapted: torch.nn.Module | None = None
    adapter_header: dict | None = None
    merged: torch.nn.Module | None = None
    windows: dict = field(default_factory=dict)   # role -> (token windows, sha256)
    stages: list = field(default_factory=list)    # the chain this session runs
    plan: dict | None = None                      # its memory plan (stages/plan.py's summary)
    timings: dict = field(default_factory=dict)
    _records: list | None = None

    def __post_init__(self):
        if self.source is not None:
            self.tokenizer = self.source.tokenizer

    @property
    def cache(self) -> Cache:
        return Cache(self.cfg.run.root)

    def load_source(self, weights: bool = True) -> LoadedModel:
        """The source model; with ``weights=False`` a streamable source gives only its tokenizer and
        hash (``model`` None) and its weights load when a later step asks for them."""
        if self.source is None or (weights and self.source.model is None):
            t0 = time.time()
            with ui.status(f"loading {self.cfg.model.path} ..."):
                self.source = load_model(self.cfg.model.path, self.cfg.model.dtype, weights=weights)
            self.tokenizer = self.source.tokenizer
            if self.source.model is not None:
                self.source.model.to(pick_device(self.cfg))
                self.timings["load_s"] = round(time.time() - t0, 1)
                ui.say(f"loaded {self.cfg.model.path} ({self.source.kind}) in {self.timings['load_s']} s")
        return self.source

    def heldout(self) -> torch.Tensor | None:
        """The held-out windows this session made, else the run's cached ones (never generated here)."""
        if "heldout" in self.windows:
            return self.windows["heldout"][0]
        return self.run.heldout_windows(self.base_info, self.tokenizer)

    def text(self, role: str, section: DictConfig):
        """(token windows [n, seq_len], sha256) for calibration ("calib") or held-out perplexity
        ("heldout"); self-generated text is cached by content. Under torch.distributed rank 0 makes
        them and every rank gets rank 0's."""
        if role in self.windows:
            return self.windows[role]
        if dist.active():
            self.windows[role] = dist.from_main(lambda: self.text(role, section))
            return self.windows[role]
        if section.source == "self":
            src = self.load_source()
            key = Cache.text_key(src.source_hash, role, section)
            windows = self.cache.load_text(key)
            if windows is not None:
                ui.say(f"{role} text: reusing {section.n_samples} x {section.seq_len} self-generated tokens")
            else:
                with ui.progress_bar(f"sampling {role} text from the 16-bit model", None,
                                     unit="sequences") as advance:
                    windows = selfgen.self_text_windows(src.model, src.tokenizer, role, section.n_samples,
                                                        section.seq_len, section.seed, progress=advance)
                path = self.cache.save_text(key, windows)
                ui.say(f"{role} text: sampled {section.n_samples * section.seq_len} tokens, cached at {path}")
        elif section.source == "shipped":
            src = self.load_source(weights=False)
            windows = shipped.windows(self.cfg.model.path, role, src.source_hash, section.n_samples, section.seq_len,
                                      section.seed)
            ui.say(f"{role} text: {section.n_samples} x {section.seq_len} tokens shipped with lotaqaf "
                   f"({shipped.path_for(self.cfg.model.path, role).name})")
        else:
            tok = self.load_source(weights=False).tokenizer
            if tok is None:
                raise LotaqafError(f"{role} text from {section.source} needs a model with a tokenizer")
            if section.source == "file":
                windows = textfile.file_windows(section.path, tok, section.n_samples, section.seq_len, section.seed)
            else:
                windows = textfile.c4_windows(tok, section.n_samples, section.seq_len, section.seed)
        self.windows[role] = (windows, "sha256:" + hashlib.sha256(windows.numpy().tobytes()).hexdigest())
        return self.windows[role]

    def records(self) -> list[dict] | None:
        """The training records of a file or hub source (None for self-distilled or shipped data,
        which need the model or its hash): read once, before the model loads, so that bad data is
        refused before any work."""
        d = self.cfg.data
        if d.source in ("self_distill", "shipped"):
            return None
        if self._records is None:
            self._records = sft.load_records(d.source, d.path, d.n_samples, d.seed)
        return self._records

    def examples(self) -> list[dict]:
        """Tokenized, prompt-masked training examples; self-distilled data is generated once and cached.
        Under torch.distributed rank 0 makes them and every rank gets rank 0's."""
        if dist.active():
            return dist.from_main(self.examples)
        d = self.cfg.data
        src = self.load_source(weights=d.source == "self_distill")
        if d.source == "self_distill":
            key = Cache.sft_key(src.source_hash, d)
            records = self.cache.load_sft(key)
            if records is not None:
                ui.say(f"training data: reusing {len(records)} self-distilled examples")
            else:
                with ui.progress_bar("self-distilling training answers from the 16-bit model", d.n_samples,
                                     unit="answers") as adv:
                    records = sft.self_distill_records(src.model, src.tokenizer, d.n_samples, d.target_len, d.seed,
                                                       progress=adv)
                path = self.cache.save_sft(key, records)
                ui.say(f"training data: {len(records)} self-distilled examples cached at {path}")
        elif d.source == "shipped":
            records = shipped.records(self.cfg.model.path, src.source_hash, d.n_samples, d.seed)
            ui.say(f"training data: {len(records)} self-distilled examples shipped with lotaqaf")
        else:
            records = self.records()
        return sft.tokenize_records(src.tokenizer, records, d.source_len, d.target_len)


# ---------------------------------------------------------------------------------------------
# the chain's steps
# ---------------------------------------------------------------------------------------------

def step_quantize(s: Session) -> None:
    """The quantized base: the source itself when it is a GPTQ checkpoint, else from the cache, else
    quantized now (and cached)."""
    if s.base is not None:
        return
    cfg, q = s.cfg, s.cfg.quant
    src = s.load_source(weights=not streams(cfg))
    if src.quantized:
        ui.say(f"{cfg.model.path} is already a GPTQ checkpoint: skipping quantization")
        s.base, s.base_info = src.model, src.info
        s.run.write_record("quantize", {"skipped": True, "checkpoint": cfg.model.path,
                                        "content_hash": src.source_hash, "source_hash": src.source_hash})
        return
    if src.model is not None:
        quantize.check_model(src.model, q)
    t0 = time.time()
    calib, calib_hash = s.text("calib", cfg.calib)
    s.timings["calib_s"] = round(time.time() - t0, 1)
    settings = quantize.settings(q)
    key = Cache.quantized_key(src.source_hash, calib_hash, settings)
    out_dir = s.cache.quantized_dir(key)
    try:
        with ui.status("loading the cached quantized base ...") if is_checkpoint(out_dir) else contextlib.nullcontext():
            cached = s.cache.load_quantized(key)
    except LotaqafError as e:
        ui.say(f"[yellow]cached quantized base is unusable ({e}); quantizing again[/yellow]")
        cached = None
    if cached is not None:
        s.base, _tok, s.base_info = cached
        s.base.to(pick_device(cfg))
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
                s.base, _tok, s.base_info = s.cache.load_quantized(key)
            s.base.to(pick_device(cfg))
    else:
        s.base, stats = quantize.quantize(src.model, calib, q, pick_device(cfg), split=_linear_split())
        s.timings["quantize_s"] = round(time.time() - t0, 1)
        with ui.status("writing the quantized checkpoint ..."):
            chash = dist.from_main(lambda: save_quantized(s.base, src.tokenizer, out_dir, settings, provenance))
        s.base_info = {"settings": settings, "provenance": provenance, "content_hash": chash}
    per_kind = quantize.summarize(stats)
    quantize.show_table(per_kind)
    s.run.write_record("quantize", {
        "cached": False, "checkpoint": str(out_dir), "content_hash": chash, "source_hash": src.source_hash,
        "settings": settings, "calibration_hash": calib_hash, "timings": dict(s.timings),
        "streamed": src.model is None, "error_by_kind": per_kind, "layers": [st.__dict__ for st in stats]})
    ui.say(f"quantized base written to {out_dir} in {s.timings['quantize_s']} s")


def _quantize_streamed(s: Session, calib: torch.Tensor, out_dir: Path, provenance: dict) -> tuple[list, str]:
    """Streamed quantization into ``out_dir``: the source's shards read one decoder layer at a time,
    each quantized layer written as its own shard; returns (per-layer stats, content hash)."""
    from .io.models import check_arch, model_dir
    from .io.shards import ShardedSource

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
                                           calib, cfg.quant, device, split=_linear_split())
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
    extra = {"omega": a.omega, "offset_granularity": a.offset_granularity, "markers": a.markers} \
        if a.kind == "lota" else \
        {"alpha": a.alpha, "dropout": a.dropout}
    spec = adapter_spec(a.kind, cfg.model.target_modules, rank=a.rank, **extra)
    s.run.ensure()
    s.adapted, summary = train.train(s.base, examples, spec, cfg.optim, cfg.seed, s.run, data_seed=cfg.data.seed,
                                     resume=cfg.resume, pad_id=sft.pad_token_id(tok) if tok is not None else 0,
                                     tensorboard_dir=s.run.tensorboard_dir if dist.main() else None)
    s.timings["train_s"] = summary.pop("train_s")
    s.adapter_header = {**spec, "base_hash": s.base_info["content_hash"], "steps": cfg.optim.steps, "seed": cfg.seed}
    if dist.main():
        save_adapter(s.adapted, s.run.adapter_file, s.adapter_header)
    s.run.write_record("train", {"adapter": s.adapter_header, "timings": dict(s.timings), **summary})
    ui.say(f"adapter written to {s.run.adapter_file} ({s.timings['train_s']} s of training)")


def step_ppl(s: Session) -> None:
    cfg = s.cfg
    src = s.load_source(weights=False)
    windows, digest = s.text("heldout", cfg.ppl)
    models = {} if src.quantized or src.model is None else {"16-bit": src.model}
    if src.model is None:
        ui.say("16-bit perplexity: skipped (the source was streamed, not loaded; "
               "`lotaqaf eval --tasks ppl --model 16bit` loads it whole)")
    if s.base is not None:
        models[f"GPTQ INT{cfg.quant.bits} g{cfg.quant.group_size}"] = s.base
    if s.adapted is not None:
        models[f"GPTQ + {cfg.adapter.kind} (adapter)"] = s.adapted
    results = evaluate.perplexities(models, windows, cfg.ppl.batch_size)
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
                s.adapted, s.tokenizer, s.adapter_header, s.base_info = run.load_adapted()
    kind = s.adapter_header["kind"]
    s.base = None  # from here on the chain needs the adapted and merged models only (memory: core/plan.py)
    memory.trim_heap()
    t0 = time.time()
    s.merged, layers, cert = merge.merge(s.adapted, kind, s.heldout())
    cert.update(base_hash=s.base_info["content_hash"], adapter_sha256="sha256:" + file_sha256(run.adapter_file))
    prov = {**s.base_info.get("provenance", {}), "merged_from": {"base": s.base_info["content_hash"],
                                                                "adapter": cert["adapter_sha256"], "kind": kind}}
    with atomic_dir(run.merged_dir) as tmp:
        with ui.status("writing the merged checkpoint ..."):
            save_quantized(s.merged, s.tokenizer, tmp, s.base_info["settings"], prov, merged=layers or None)
        if s.cfg.merge.verify:  # the written checkpoint replaces the in-memory merged model once it is checked
            s.merged = None
            memory.trim_heap()
            reloaded, _, rinfo = load_quantized(tmp)
            merge.check_reloaded(reloaded, s.adapted, kind, cert)
            cert["merged_hash"] = rinfo["content_hash"]
            s.merged = reloaded
    cert["seconds"] = round(time.time() - t0, 1)
    path = run.write_record("merge_certificate", cert)
    ui.say(f"merged {kind} adapter into {run.merged_dir}: max |logit diff| = {cert['max_abs_logit_diff']:g}"
           + (f" (from disk: {cert['max_abs_logit_diff_from_disk']:g})" if s.cfg.merge.verify else "")
           + (f", {cert['codes']['changed_frac']:.3g} of codes changed" if layers else ""))
    if "perplexity" in cert:
        p = cert["perplexity"]
        ui.say(f"held-out perplexity: adapter {p['adapter']:.4f}, merged {p['merged']:.4f}")
    ui.say(f"certificate: {path}")


def step_eval(s: Session) -> None:
    """The recipe's eval tasks on the merged LoTA model (or, for the LoRA baselines, whose merge is
    lossy, the adapter model)."""
    cfg = s.cfg
    tasks = [t for t in cfg.eval.tasks if t != "mmlu" or s.tokenizer is not None]
    if not tasks:
        ui.say("eval: this model has no tokenizer: MMLU skipped")
        return
    lota = cfg.adapter.kind == "lota" and s.merged is not None
    model, label = (s.merged, "merged") if lota else (s.adapted, "adapter")
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


# ---------------------------------------------------------------------------------------------
# the commands
# ---------------------------------------------------------------------------------------------

def run_command(command: str, cfg: DictConfig) -> None:
    if torch.get_num_threads() > (os.cpu_count() or 1):
        torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(cfg.seed)
    kernels.set_mode(cfg.kernels)
    if dist.launched():
        start_distributed(command, cfg)
    try:
        _COMMANDS[command](cfg, command)
    finally:
        dist.finish()


def start_distributed(command: str, cfg: DictConfig) -> None:
    """Join torchrun's group, check that every rank runs the same resolved config and that the
    ranks divide the step's micro-batches; ranks other than 0 print nothing but their errors."""
    ranks = int(os.environ["WORLD_SIZE"])
    if command not in ("train", "quantize"):
        raise LotaqafError(f"`lotaqaf {command}` runs in one process; only train and quantize run under torchrun")
    if command == "train" and "train" in cfg.stages and cfg.optim.grad_accum % ranks:
        raise LotaqafError(f"optim.grad_accum={cfg.optim.grad_accum} is not a multiple of the {ranks} ranks: each "
                           "rank runs optim.grad_accum / ranks micro-batches a step (set optim.grad_accum to a "
                           f"multiple of {ranks}; the global batch is optim.batch_size x optim.grad_accum)")
    dist.watch_launcher()
    dist.init(pick_device(cfg).type)
    if not dist.main():
        os.environ["LOTAQAF_QUIET"] = "1"
    dist.same_on_all(OmegaConf.to_yaml(cfg, resolve=True), "the resolved config")


DISTRIBUTED = ("quantize", "train")  # the steps every rank runs under torchrun; the rest run on rank 0 alone


def cmd_chain(cfg: DictConfig, command: str) -> None:
    stages = ["quantize"] if command == "quantize" else list(cfg.stages)
    if dist.active() and not dist.main():  # quantize and train run on every rank; what follows, on rank 0
        stages = [st for st in stages if st in DISTRIBUTED]
    run = RunDir(dist.from_main(lambda: str(RunDir.for_config(cfg).path)), cfg)  # rank 0 names it
    s = Session(cfg, run, stages=stages)
    dist.from_main(lambda: preflight(s, stages))
    name = stages[0] if stages else None
    device, peaks = pick_device(cfg), {}
    try:
        for name in stages:
            if dist.active() and name not in DISTRIBUTED:  # the group's work is done (the other ranks' loop
                dist.leave()                               # ended): rank 0 runs the rest as one process
            ui.say(f"[bold]== {name} ==[/bold]")
            memory.trim_heap()
            memory.reset_peak(device)
            STEPS[name](s)
            peak = memory.peak_bytes(device)
            if peak is not None:
                peaks[name] = round(peak / 1e9, 3)
                s.run.log(f"stage {name} done (peak {'GPU' if device.type == 'cuda' else 'resident'} memory "
                          f"{peaks[name]} GB)")
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
                                      "peak_gb": peaks, "plan": s.plan})
    ui.say(f"run directory: {s.run.path}")


def preflight(s: Session, stages: list[str]) -> None:
    """What can be checked before the model's weights load: the quantizer settings against the
    model's layer shapes (from its config alone), and training data read from a file or the hub."""
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
        from .stages import plan

        p, cap, where = make_plan(cfg, stages)
        if cap is not None:
            plan.check(p, cap, where)
        s.plan = plan.summary(p, cap)


def make_plan(cfg: DictConfig, stages: list[str]):
    """(plan of ``stages``, capacity in GB, what the capacity is): plan.device_gb, else the memory of
    the device this run uses (CUDA: the GPU's; CPU: the machine's RAM)."""
    from .io.models import model_config
    from .stages import plan

    device = pick_device(cfg)
    named = cfg.plan.device_gb is not None
    device_type = "cpu" if cfg.device == "cpu" or (not named and device.type == "cpu") else "cuda"
    mc, where_config = model_config(cfg.model.path)
    p = plan.make(cfg, mc, where_config, stages, device_type, streams(cfg), streamable(cfg.model.path))
    if named:
        return p, float(cfg.plan.device_gb), f"plan.device_gb={cfg.plan.device_gb:g}"
    cap = memory.capacity_bytes(device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda" else "this machine's RAM")
    return p, None if cap is None else round(cap / 1e9, 1), where


def cmd_plan(cfg: DictConfig, _command: str) -> None:
    from .stages import plan

    p, cap, where = make_plan(cfg, list(cfg.stages))
    plan.show(p, cap, where)
    if cfg.run.dir:  # a run directory: keep the plan beside its measured memory (memory.json)
        RunDir(cfg.run.dir).write_record("plan", plan.summary(p, cap))


def cmd_merge(cfg: DictConfig, _command: str) -> None:
    run = find_run(cfg.run.dir, cfg.run.root, NEEDS["merge"])
    writable_dir(str(run.path), "run.dir")  # before the models load
    if cfg.merge.unmerge:
        return cmd_unmerge(run)
    if is_checkpoint(run.merged_dir):
        raise LotaqafError(f"{run.merged_dir} already exists: remove it to merge again")
    step_merge(Session(cfg, run))


def cmd_unmerge(run: RunDir) -> None:
    if not is_checkpoint(run.merged_dir):
        raise LotaqafError(f"{run.path} has no merged checkpoint to unmerge (run `lotaqaf merge` first)")
    if run.unmerged_dir.exists():
        raise LotaqafError(f"{run.unmerged_dir} already exists: remove it to unmerge again")
    model, tok, info = run.load_merged()  # also verifies the merged checkpoint's hashes
    base = merge.unmerge(model, info["merged"])
    prov = {k: v for k, v in info["provenance"].items() if k != "merged_from"}
    save_quantized(base, tok, run.unmerged_dir, info["settings"], {**prov, "unmerged_from": info["content_hash"]})
    restored, original = quantized_tensor_hash(run.unmerged_dir), quantized_tensor_hash(run.base_dir())
    result = {"unmerged": str(run.unmerged_dir), "tensor_hash": restored, "base_tensor_hash": original,
              "identical": restored == original}
    run.write_record("unmerge", result)
    ui.say(f"unmerged into {run.unmerged_dir}: quantized tensors "
           f"{'identical to' if result['identical'] else 'DIFFER from'} the base ({restored[:23]}...)")
    if not result["identical"]:
        raise LotaqafError("unmerge did not restore the base exactly")


def cmd_eval(cfg: DictConfig, _command: str) -> None:
    from .eval.gsm8k import HUB_UNREACHABLE
    from .io.hub import hub_reachable

    ev = cfg.eval
    sel = ev.model or "merged"
    if "gsm8k" in ev.tasks and ev.gsm8k_file is None and not hub_reachable():
        raise LotaqafError(HUB_UNREACHABLE)
    run = None
    if sel in RUN_MODELS:
        run = find_run(cfg.run.dir, cfg.run.root, NEEDS["eval"])
    elif cfg.run.dir:
        run = find_run(cfg.run.dir)
    info = None
    if sel not in RUN_MODELS:
        model, tok, label = _model_at_path(sel)
    elif sel == "16bit":
        rc = run.config()
        lm = load_model(rc.model.path, rc.model.dtype)
        model, tok, label = lm.model, lm.tokenizer, "16bit"
    elif sel == "gptq":
        model, tok, info = run.load_base()
        label = "gptq"
    elif sel == "adapter":
        model, tok, _meta, info = run.load_adapted()
        label = "adapter"
    else:
        model, tok, info = run.load_merged()
        label = "merged"
    windows = run.heldout_windows(info, tok) if run is not None and "ppl" in ev.tasks else None
    out = evaluate.evaluate(model, tok, ev, label, windows)
    write_eval(run if run is not None else RunDir("evals"), out)


def _model_at_path(sel: str):
    p = Path(sel)
    if not p.exists():
        raise LotaqafError(f"--model {sel}: no such path (or use one of {', '.join(RUN_MODELS)} with run=DIR)")
    if p.is_dir() and not ((p / "quantize_config.json").is_file() or (p / "config.json").is_file()):
        raise LotaqafError(f"--model {sel} is not a model directory (no config.json or quantize_config.json)")
    lm = load_model(str(p))
    return lm.model, lm.tokenizer, p.name


@torch.no_grad()
def _write_export(fmt: str, model, tok, info: dict, tmp: Path, ex, exact: list[str], final_dir: Path,
                  source: str, report: dict):
    """Write ``model`` in ``fmt`` under ``tmp``; returns the model as the files hold it (what the
    in-memory comparison runs) and whether a GPTQ export has an offset branch."""
    if fmt == "gguf":
        from .io.gguf_export import export_gguf, stored_model

        report.update(export_gguf(model, source, tmp / "model.gguf", tok, exact, ex.gguf_type, ex.allow_lossy))
        return stored_model(model, ex.gguf_type), False  # the values the blocks hold, in float32
    if fmt == "torchao":
        from .io.torchao_export import export_torchao

        report.update(export_torchao(model, tok, tmp, exact=exact))
        return model, False  # every stored value is the merged model's own
    files, branches, extra = export.convert(model, fmt, ex.allow_lossy, ex.offset_branch, exact)
    report.update(extra)
    if fmt == "gptq":
        save_quantized(files, tok, tmp, info["settings"], {**info["provenance"], "exported_from": info["content_hash"]})
        if branches:
            from .io.offset_lora import save_offset_lora

            report["offset_lora"] = save_offset_lora(tmp / "offset_lora", branches, str(final_dir))
        return export.with_branches(files, branches or {}), bool(branches)
    if hasattr(files.config, "quantization_config"):  # hf16: a plain transformers checkpoint
        del files.config.quantization_config
    files.save_pretrained(str(tmp), safe_serialization=True)
    if tok is not None:
        tok.save_pretrained(str(tmp))
    return files, False


def _reference_probe(model, held, tok, report: dict):
    """(prompts, lotaqaf's greedy continuations, its logits) for the engine checks; records the same
    probe run on the values the files hold (``held``) as report["storage_on_prompts"]: what storage
    alone changes, the bar an engine is measured against."""
    prompts = export.probe_prompts(tok, model.config.vocab_size)
    dense = export.dense_bytes(model) < (memory.capacity_bytes(next(model.parameters()).device) or 0) / 4
    with ui.status("lotaqaf's greedy continuations of the probe prompts ..."):
        conts, logits = export.reference_probe(model, prompts, dense=dense)
        report["storage_on_prompts"] = export.compare_probe(
            conts, logits, *export.reference_probe(held, prompts, dense=dense, forced_on=conts))
    return prompts, conts, logits


def cmd_export(cfg: DictConfig, _command: str) -> None:
    """Write the merged model in ``export.format``, measure it against the merged model in memory
    (logits, perplexity) and in the engines that serve the format (greedy continuations, logits), and
    record all of it in export-<format>.json (export-gguf-q4_k.json for a GGUF K-quant)."""
    from .io import serving

    ex = cfg.export
    fmt, gguf_type = ex.format, ex.gguf_type
    run = find_run(cfg.run.dir, cfg.run.root, NEEDS["export"])
    writable_dir(str(run.path), "run.dir")  # where the export goes, before the model loads
    name = f"gguf-{gguf_type}" if fmt == "gguf" and gguf_type != "q4_1" else fmt  # K-quants beside Q4_1
    out_dir = run.export_dir(name)
    model, tok, info = run.load_merged()
    if out_dir.exists():
        raise LotaqafError(f"{out_dir} already exists: remove it to export again")
    windows = run.heldout_windows(info, tok)
    report: dict = {"format": fmt, "source": str(run.merged_dir), "merged_hash": info["content_hash"]}
    others = [f for f in export.exact_formats(model) if f != fmt]
    qmods = quantized_modules(model)
    qnames, weights = list(qmods), sum(q.in_features * q.out_features for q in qmods.values())
    with atomic_dir(out_dir) as tmp:
        held, branched = _write_export(fmt, model, tok, info, tmp, ex, others, out_dir, run.config().model.path, report)
        with ui.status("comparing the export with the merged model ..."):
            report.update(export.compare(model, held, windows))
        size, layer_bytes = serving.disk_size(tmp), serving.quantized_layer_bytes(tmp, fmt, qnames)
        report.update({"size_bytes": size, "bits_per_weight": 8 * layer_bytes / weights})
        probe = _reference_probe(model, held, tok, report) if ex.check else None
        del held, qmods
        if probe is not None:
            del model  # the engine loads the export in its own process: one model in memory at a time
            memory.trim_heap()
            report["engines"] = {}
            for kind in export.ENGINES[fmt] if fmt != "gptq" or branched else ["gptqmodel"]:
                with ui.status(f"running the export in {kind} ..."):
                    report["engines"][kind] = serving.engine_check(
                        kind, tmp, *probe, serving.default_pythons(ex.check_python),
                        list(export.PROBE_TEXTS) if tok is not None else None)
    run.write_record(f"export-{name}", report)
    _say_export(fmt, out_dir, report, branched)


def _say_export(fmt: str, out_dir: Path, report: dict, branched: bool) -> None:
    held_as = {"hf16": "float32", "gptq": "codes, scales, zeros" + (", offset branch" if branched else "")}
    ui.say(f"exported {fmt} to {out_dir}: {ui.size(report['size_bytes'])} on disk, {report['bits_per_weight']:.3f} "
           f"bits per quantized weight ({held_as.get(fmt, 'codes, scales, zeros')}); "
           f"max |logit diff| vs the merged model {report['max_abs_logit_diff']:.3g}"
           + (f", perplexity {report['perplexity']['export']:.4f} vs {report['perplexity']['merged']:.4f}"
              if "perplexity" in report else ""))
    if "layers_by_type" in report:
        fallback = " (Q4_1 where the K-quant does not fit: D_in not a multiple of 256)" if len(report["layers_by_type"]) > 1 else ""
        ui.say(f"  GGUF layers: {', '.join(f'{k.upper()} {n}' for k, n in report['layers_by_type'].items())}{fallback}; "
               f"largest weight change {report['max_weight_error']:.3g} ({report['max_weight_error_in_steps']:.3g} steps)")
    if "storage_on_prompts" in report:
        r = report["storage_on_prompts"]
        ui.say(f"  the stored values, in lotaqaf (float32): {r['same_continuations']}/{r['prompts']} greedy "
               f"continuations identical, max |logit diff| {r['max_abs_logit_diff']:.3g}")
    for kind, r in report.get("engines", {}).items():
        if r["checked"]:
            ui.say(f"  {r['engine']}: {r['same_continuations']}/{r['prompts']} greedy continuations of "
                   f"{r['new_tokens']} tokens identical, max |logit diff| {r['max_abs_logit_diff']:.3g}"
                   + (f"; its tokenizer gives lotaqaf's ids for {r['tokenizer_same_ids']}/{r['prompts']} prompts"
                      if "tokenizer_same_ids" in r else ""))
            if kind == "llama_cpp":
                ui.say("    (llama.cpp rounds activations to 8 bits in its quantized dot products, for any GGUF: "
                       "docs/formats.md, serving table)")
        else:
            ui.say(f"  {kind}: not checked: {r['why']}")


_COMMANDS = {"train": cmd_chain, "quantize": cmd_chain, "merge": cmd_merge, "eval": cmd_eval, "export": cmd_export,
             "plan": cmd_plan}
