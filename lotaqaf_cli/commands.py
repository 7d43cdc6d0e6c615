"""The commands: one function each, from a composed and validated config to files on disk.

    lotaqaf train     cmd_train: the chain (chain.run_chain) over cfg.stages
    lotaqaf quantize  cmd_quantize: the quantize step alone
    lotaqaf plan      cmd_plan: the memory plan of cfg.stages (stages/plan.py)
    lotaqaf merge     cmd_merge: a run's adapter merged (or, merge.unmerge, its merged checkpoint unmerged)
    lotaqaf eval      cmd_eval: one model of a run (or a model path) on cfg.eval.tasks
    lotaqaf export    cmd_export: a run's merged model in cfg.export.format, checked in the engines that
                      serve the format (serving/)

run_command sets the process up (threads, seed, kernels, torchrun's group) and calls one of them.
Run files are named only by io/rundir.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import lotaqaf_kernels as kernels
import torch
from omegaconf import DictConfig, OmegaConf

from . import chain, dist, memory, precision, ui
from .config import writable_dir
from .core.nf4 import NF4_BLOCKSIZE, is_nf4, nf4_bits_per_weight
from .core.qlinear import quantized_modules
from .errors import LotaqafError
from .io import sizes
from .io.checkpoint import is_checkpoint, quantized_tensor_hash, save_quantized
from .io.files import atomic_dir
from .io.models import load_model
from .io.rundir import NEEDS, RunDir, find_run
from .serving import engines, probe
from .session import Session, pick_device
from .stages import evaluate, export, merge, plan

RUN_MODELS = ("16bit", "gptq", "adapter", "merged")


def run_command(command: str, cfg: DictConfig) -> None:
    if torch.get_num_threads() > (os.cpu_count() or 1):
        torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(cfg.seed)
    kernels.set_mode(cfg.kernels)
    if dist.launched():
        start_distributed(command, cfg)
    try:
        COMMANDS[command](cfg)
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


def cmd_train(cfg: DictConfig) -> None:
    chain.run_chain(cfg, list(cfg.stages))


def cmd_quantize(cfg: DictConfig) -> None:
    chain.run_chain(cfg, ["quantize"])


def cmd_plan(cfg: DictConfig) -> None:
    p, cap, where = plan.for_config(cfg, list(cfg.stages), pick_device(cfg))
    plan.show(p, cap, where)
    if cfg.run.dir:  # a run directory: keep the plan beside its measured memory (memory.json)
        RunDir(cfg.run.dir).write_record("plan", plan.summary(p, cap))


def cmd_merge(cfg: DictConfig) -> None:
    run = find_run(cfg.run.dir, cfg.run.root, NEEDS["merge"])
    writable_dir(str(run.path), "run.dir")  # before the models load
    if cfg.merge.unmerge:
        return cmd_unmerge(run)
    if is_checkpoint(run.merged_dir):
        raise LotaqafError(f"{run.merged_dir} already exists: remove it to merge again")
    chain.run_step(Session(cfg, run), "merge")


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


def cmd_eval(cfg: DictConfig) -> None:
    ev = cfg.eval
    sel = ev.model or "merged"
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
    prec = precision.resolve(cfg.precision, pick_device(cfg))
    if sel == "gptq":
        model, tok, info = run.load_base(prec.dtype)
        label = "gptq"
    elif sel == "adapter":
        model, tok, _meta, info = run.load_adapted(prec.dtype)
        label = "adapter"
    elif sel == "merged":
        model, tok, info = run.load_merged(prec.dtype)
        label = "merged"
    ui.say(f"computing in {prec.name} ({prec.why})")
    precision.cast_(model.to(pick_device(cfg)), prec.dtype)
    windows = run.heldout_windows(info, tok) if run is not None and "ppl" in ev.tasks else None
    out = evaluate.evaluate(model, tok, ev, label, windows)
    chain.write_eval(run if run is not None else RunDir.for_evals(), out)


def _model_at_path(sel: str):
    p = Path(sel)
    if not p.exists():
        raise LotaqafError(f"--model {sel}: no such path (or use one of {', '.join(RUN_MODELS)} with run=DIR)")
    if p.is_dir() and not ((p / "quantize_config.json").is_file() or (p / "config.json").is_file()):
        raise LotaqafError(f"--model {sel} is not a model directory (no config.json or quantize_config.json)")
    lm = load_model(str(p))
    return lm.model, lm.tokenizer, p.name


def cmd_export(cfg: DictConfig) -> None:
    """Write the merged model in ``export.format``, measure it against the merged model in memory
    (logits, perplexity) and in the engines that serve the format (greedy continuations, logits), and
    record all of it in export-<format>.json (export-gguf-q4_k.json for a GGUF K-quant)."""
    ex = cfg.export
    fmt, gguf_type = ex.format, ex.gguf_type
    run = find_run(cfg.run.dir, cfg.run.root, NEEDS["export"])
    writable_dir(str(run.path), "run.dir")  # where the export goes, before the model loads
    name = f"gguf-{gguf_type}" if fmt == "gguf" and gguf_type != "q4_1" else fmt  # K-quants beside Q4_1
    if ex.source == "adapter":
        name = f"{fmt}-adapter"
    out_dir = run.export_dir(name)
    qlora = False
    if ex.source == "adapter":  # a LoRA-type run as it deploys unmerged: the base + the adapter in PEFT
        model, tok, header, info = run.load_adapted()
        if header["kind"] not in ("lora", "qalora"):
            raise LotaqafError(f"export.source=adapter exports a LoRA or QA-LoRA adapter beside its base; this run's "
                               f"adapter is {header['kind']}, which merges exactly: export its merged model")
        qlora = info["settings"].get("method") == "nf4"
        if qlora and info["settings"]["group_size"] != NF4_BLOCKSIZE:
            raise LotaqafError(f"transformers quantizes NF4 in blocks of {NF4_BLOCKSIZE}; this run's NF4 base used "
                               f"quant.group_size={info['settings']['group_size']}, which no transformers load reproduces")
        if fmt != ("hf16" if qlora else "gptq"):
            raise LotaqafError("export.source=adapter: a QLoRA run (quant=nf4) exports with --format hf16 (the 16-bit "
                               "source, NF4 at load, + the LoRA)" if qlora else "export.source=adapter: a LoRA or "
                               "QA-LoRA run exports with --format gptq (the GPTQ base + the LoRA)")
    else:
        model, tok, info = run.load_merged()
    if out_dir.exists():
        raise LotaqafError(f"{out_dir} already exists: remove it to export again")
    windows = run.heldout_windows(info, tok)
    report: dict = {"format": fmt, "source": str(run.merged_dir if ex.source == "merged" else run.adapter_file),
                    "merged_hash" if ex.source == "merged" else "base_hash": info["content_hash"]}
    if qlora:
        others, qmods = [], {}
    elif ex.source == "adapter":
        files, lora = export.lora_branch_model(model)
        others, qmods = [], quantized_modules(files)
    else:
        others, qmods = [f for f in export.exact_formats(model) if f != fmt], quantized_modules(model)
    qnames, weights = list(qmods), sum(q.in_features * q.out_features for q in qmods.values())
    with atomic_dir(out_dir) as tmp:
        if qlora:
            source = load_model(run.config().model.path).model
            held, branched = export.write_qlora(model, source, tok, tmp, out_dir, info["settings"]["group_size"], report)
            del source
        elif ex.source == "adapter":
            held, branched = export.write_lora(files, lora, tmp, tok, info, run.adapter_file, out_dir, report)
            del files
        else:
            held, branched = export.write(model, fmt, tmp, ex, tok, info, run.config().model.path, out_dir, others,
                                          report)
        with ui.status(f"comparing the export with the {ex.source} model ..."):
            report.update(export.compare(model, held, windows))
        report["size_bytes"] = sizes.disk_size(tmp)
        if qlora:  # the files hold 16-bit weights; served, they are NF4 + the LoRA
            n = sum(m.in_features * m.out_features for m in model.modules() if is_nf4(m))
            lora_params = sum(a.numel() + b.numel() for a, b in export.lora_pairs(model).values())
            report["bits_per_weight"] = nf4_bits_per_weight(info["settings"]["group_size"]) + 16 * lora_params / n
        else:
            report["bits_per_weight"] = 8 * sizes.quantized_layer_bytes(tmp, fmt, qnames) / weights
        reference = None
        if ex.check:
            # an unmerged adapter's reference is the base + branch form the files hold (dequantizing the LoRA
            # layers' bases for the exact probe would leave QA-LoRA without its groups)
            reference, report["storage_on_prompts"] = probe.reference(held if ex.source == "adapter" else model,
                                                                      held, tok)
        del held, qmods
        if reference is not None:
            del model  # the engine loads the export in its own process: one model in memory at a time
            memory.trim_heap()
            report["engines"] = {}
            for kind in ["transformers_bnb_peft"] if qlora else engines.engines_for(fmt, branched):
                with ui.status(f"running the export in {kind} ..."):
                    report["engines"][kind] = engines.engine_check(
                        kind, tmp, *reference, engines.default_pythons(ex.check_python),
                        list(probe.PROBE_TEXTS) if tok is not None else None)
    run.write_record(f"export-{name}", report)
    _say_export(fmt, out_dir, report, branched, "adapter" if ex.source == "adapter" else "merged")


def _say_export(fmt: str, out_dir: Path, report: dict, branched: bool, source: str = "merged") -> None:
    held_as = {"hf16": "the 16-bit source, NF4 at load, the LoRA" if "nf4" in report else "float32",
               "gptq": "codes, scales, zeros" + ((", the LoRA" if source == "adapter" else ", offset branch")
                                                 if branched else "")}
    ui.say(f"exported {fmt} to {out_dir}: {ui.size(report['size_bytes'])} on disk, {report['bits_per_weight']:.3f} "
           f"bits per quantized weight ({held_as.get(fmt, 'codes, scales, zeros')}); "
           f"max |logit diff| vs the {source} model {report['max_abs_logit_diff']:.3g}"
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


COMMANDS = {"train": cmd_train, "quantize": cmd_quantize, "merge": cmd_merge, "eval": cmd_eval, "export": cmd_export,
            "plan": cmd_plan}
