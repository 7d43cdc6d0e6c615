"""Stage `merge`: fold a run's trained adapter into its quantized base, with a bit-exact certificate.

    lotaqaf merge [run=DIR] [--no-verify] [--unmerge]

Reads: <run>/config.yaml, <run>/quantize.json (the base checkpoint), <run>/adapter.safetensors.
Writes: <run>/merged/ (GPTQ layout + fractional zero points + markers, docs/formats.md) and
<run>/merge_certificate.json; with --unmerge, <run>/unmerged/ (the base again, restored from the
merged checkpoint alone).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from .. import __version__, ui
from ..core.lora import attach_lora
from ..core.merge import merge_lora_model, merge_model
from ..core.perplexity import perplexity
from ..core.ternary import attach_ternary_adapters
from ..errors import LotaqafError
from ..io.adapter import adapter_layers, check_base, read_adapter
from ..io.checkpoint import (
    WEIGHTS,
    atomic_dir,
    load_quantized,
    quantized_tensor_hash,
    read_safetensors,
    save_quantized,
    unmerge_state,
    write_json_atomic,
)
from ..io.models import file_sha256
from ..io.rundir import cache_key
from .common import TEXT_VERSION

PROBE_SEED, PROBE_SHAPE = 0, (4, 64)


def newest_run(root: str, marker: str) -> Path | None:
    """The most recently written runs/<recipe>/<timestamp>/ that holds ``marker`` (None: none)."""
    runs = sorted(Path(root).glob(f"*/*/{marker}"), key=lambda f: f.stat().st_mtime)
    return runs[-1].parent if runs else None


def find_run(run: str | None, root: str = "runs") -> Path:
    if run:
        p = Path(run)
        if not p.is_dir():
            raise LotaqafError(f"run directory does not exist: {run}")
        return p
    found = newest_run(root, "adapter.safetensors")
    if found is None:
        raise LotaqafError(f"no run with a trained adapter under {root}/ (run `lotaqaf train` first, or give run=DIR)")
    return found


def load_adapted(run_dir: Path):
    """(run config, base model, adapted model, tokenizer, adapter header, base checkpoint dir)."""
    adapter_file = run_dir / "adapter.safetensors"
    if not adapter_file.is_file():
        raise LotaqafError(f"run {run_dir} has no adapter.safetensors: nothing to merge (train it first)")
    if not (run_dir / "quantize.json").is_file():
        raise LotaqafError(f"run {run_dir} has no quantize.json: it is not a complete lotaqaf run")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    base_dir = Path(json.loads((run_dir / "quantize.json").read_text())["checkpoint"])
    meta, tensors = read_adapter(adapter_file)
    if not base_dir.is_dir():
        raise LotaqafError(f"the quantized base {base_dir} of run {run_dir} is gone (re-run `lotaqaf quantize`)")
    base, tok, info = load_quantized(base_dir)
    check_base(meta, info["content_hash"], adapter_file)
    model = copy.deepcopy(base)
    if meta["kind"] == "lota":
        attach_ternary_adapters(model, meta["rank"], meta["omega"], meta["offset_factor"], meta["target_modules"])
    else:
        attach_lora(model, meta["kind"], meta["rank"], meta["alpha"], 0.0, meta["target_modules"])
    layers = adapter_layers(model)
    if sorted(layers) != sorted(meta["layers"]):
        raise LotaqafError(f"adapter {adapter_file} does not match the layers of its base")
    with torch.no_grad():
        for name, m in layers.items():
            for p_name, p in m.named_parameters(recurse=False):
                key = f"{name}.{p_name}"
                if key not in tensors or tuple(tensors[key].shape) != tuple(p.shape):
                    raise LotaqafError(f"adapter {adapter_file} is corrupted: {key} is missing or misshapen")
                p.copy_(tensors[key].to(p.dtype))
    return cfg, base, model.eval(), tok, meta, base_dir, info


def probe_batch(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randint(3, vocab, PROBE_SHAPE, generator=g)


def heldout_windows(cfg, base_info) -> torch.Tensor | None:
    """The run's held-out perplexity windows, if the cache still has them."""
    from safetensors.torch import load_file

    src_hash = base_info["quantize_config"].get("lotaqaf", {}).get("source_hash")
    p = cfg.ppl
    key = cache_key(TEXT_VERSION, src_hash, "heldout", p.n_samples, p.seq_len, p.seed)
    f = Path(cfg.run.root) / "_cache" / "text" / f"{key}.safetensors"
    return load_file(str(f))["input_ids"] if f.is_file() else None


@torch.no_grad()
def run_merge(run: str | None, verify: bool = True, unmerge: bool = False) -> dict:
    run_dir = find_run(run)
    if unmerge:
        return run_unmerge(run_dir)
    out_dir = run_dir / "merged"
    if out_dir.exists():
        raise LotaqafError(f"{out_dir} already exists: remove it to merge again")
    with ui.status(f"loading {run_dir} ..."):
        cfg, base, model, tok, meta, base_dir, base_info = load_adapted(run_dir)
    probe = probe_batch(model.config.vocab_size)
    ref = model(probe).logits.float()
    merged = copy.deepcopy(model)
    t0 = time.time()
    layers = {}
    if meta["kind"] == "lota":
        layers = merge_model(merged)
    else:
        merge_lora_model(merged)
    diff = (merged(probe).logits.float() - ref).abs().max().item()
    cert = {"kind": meta["kind"], "lotaqaf_version": __version__, "probe": {"seed": PROBE_SEED,
            "shape": list(PROBE_SHAPE), "dtype": "float32", "device": "cpu"},
            "max_abs_logit_diff": diff, "exact": diff == 0.0,
            "base_hash": base_info["content_hash"],
            "adapter_sha256": "sha256:" + file_sha256(run_dir / "adapter.safetensors")}
    if layers:
        per = {n: ml.stats for n, ml in layers.items()}
        tot = {k: sum(s[k] for s in per.values()) for k in ("plus", "minus", "zero", "blocked")}
        n = max(tot["plus"] + tot["minus"] + tot["zero"], 1)
        cert["codes"] = {**tot, "total": n, "changed_frac": (tot["plus"] + tot["minus"]) / n}
        cert["layers"] = per
    windows = heldout_windows(cfg, base_info)
    if windows is not None:
        p_ad, n_tok = perplexity(model, windows)
        p_me, _ = perplexity(merged, windows)
        cert["perplexity"] = {"adapter": p_ad, "merged": p_me, "change": p_me - p_ad, "tokens": n_tok}
    if meta["kind"] == "lota" and diff != 0.0:
        raise LotaqafError(f"merge verification failed: max |logit difference| = {diff:g} (expected 0.0); "
                           "no merged checkpoint written")

    qc = base_info["quantize_config"]
    settings = {"bits": qc["bits"], "group_size": qc["group_size"], "act_order": qc.get("desc_act", False),
                "static_groups": qc.get("static_groups", False), "true_sequential": qc.get("true_sequential", False),
                "damp_percent": qc.get("damp_percent", 0.01)}
    prov = {**qc.get("lotaqaf", {}), "merged_from": {"base": base_info["content_hash"],
                                                     "adapter": cert["adapter_sha256"], "kind": meta["kind"]}}
    with atomic_dir(out_dir) as tmp:
        with ui.status("writing the merged checkpoint ..."):
            save_quantized(merged, tok, tmp, settings, prov, merged=layers or None)
        if verify:
            reloaded, _, rinfo = load_quantized(tmp)
            disk_diff = (reloaded(probe).logits.float() - ref).abs().max().item()
            cert["max_abs_logit_diff_from_disk"] = disk_diff
            if meta["kind"] == "lota" and disk_diff != 0.0:
                raise LotaqafError(f"merge verification failed on the written checkpoint: max |logit difference| "
                                   f"= {disk_diff:g}; no merged checkpoint written")
            cert["merged_hash"] = rinfo["content_hash"]
    cert["seconds"] = round(time.time() - t0, 1)
    write_json_atomic(run_dir / "merge_certificate.json", cert)
    ui.say(f"merged {meta['kind']} adapter into {out_dir}: max |logit diff| = {diff:g}"
           + (f" (from disk: {cert.get('max_abs_logit_diff_from_disk'):g})" if verify else "")
           + (f", {cert['codes']['changed_frac']:.3g} of codes changed" if layers else ""))
    if "perplexity" in cert:
        p = cert["perplexity"]
        ui.say(f"held-out perplexity: adapter {p['adapter']:.4f}, merged {p['merged']:.4f}")
    ui.say(f"certificate: {run_dir / 'merge_certificate.json'}")
    return cert


def run_unmerge(run_dir: Path) -> dict:
    merged_dir, out_dir = run_dir / "merged", run_dir / "unmerged"
    if not (merged_dir / WEIGHTS).is_file():
        raise LotaqafError(f"{run_dir} has no merged checkpoint to unmerge (run `lotaqaf merge` first)")
    if out_dir.exists():
        raise LotaqafError(f"{out_dir} already exists: remove it to unmerge again")
    model, tok, info = load_quantized(merged_dir)  # also verifies the merged checkpoint's hashes
    qc = info["quantize_config"]
    state = unmerge_state(read_safetensors(merged_dir / WEIGHTS), int(qc["bits"]))
    from safetensors.torch import save_file

    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        for f in merged_dir.iterdir():
            if f.is_file() and f.name not in (WEIGHTS, "lotaqaf_manifest.json"):
                (tmp / f.name).write_bytes(f.read_bytes())
        manifest = {f.name: file_sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        (tmp / "lotaqaf_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    base_dir = Path(json.loads((run_dir / "quantize.json").read_text())["checkpoint"])
    restored, original = quantized_tensor_hash(out_dir), quantized_tensor_hash(base_dir)
    result = {"unmerged": str(out_dir), "tensor_hash": restored, "base_tensor_hash": original,
              "identical": restored == original}
    write_json_atomic(run_dir / "unmerge.json", result)
    ui.say(f"unmerged into {out_dir}: quantized tensors {'identical to' if result['identical'] else 'DIFFER from'} "
           f"the base ({restored[:23]}...)")
    if not result["identical"]:
        raise LotaqafError("unmerge did not restore the base exactly")
    return result


def run_in_chain(ctx) -> None:
    """The `merge` step of `lotaqaf train`: merge this run's adapter (once)."""
    if (ctx.run.path / "merge_certificate.json").is_file() and (ctx.run.path / "merged").is_dir():
        ui.say("merged model already present: skipped")
        return
    run_merge(str(ctx.run.path))
