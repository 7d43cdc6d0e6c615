#!/usr/bin/env python3
"""Produce (and check against) GPTQ checkpoints written by the real `gptqmodel` library.

This script is NOT part of lotaqaf's runtime or its test dependencies. It must be run with a
side venv that has gptqmodel installed (never install gptqmodel into the project venv):

    python3 -m venv /work/gptq-venv
    /work/gptq-venv/bin/pip install torch==2.13.0
    /work/gptq-venv/bin/pip install gptqmodel==7.6.0

Modes
-----
Generate the fixtures under tests/fixtures/ (about 3 minutes on 2 CPU cores):

    GPTQMODEL_CPU_WORKERS=2 /work/gptq-venv/bin/python scripts/make_gptq_fixture.py

Only try to load a checkpoint (a merged LoTA-QAF model with fractional zero points must be refused,
an integer-only one loaded):

    GPTQMODEL_CPU_WORKERS=2 /work/gptq-venv/bin/python scripts/make_gptq_fixture.py --try-load DIR

Check a GPTQ checkpoint written by another tool (lotaqaf) against gptqmodel's own dequantization:

    GPTQMODEL_CPU_WORKERS=2 /work/gptq-venv/bin/python scripts/make_gptq_fixture.py --check DIR

`DIR` must hold model.safetensors, config.json, quantize_config.json and
`reference_dequant.safetensors` (keys `<module>.weight`, [out_features, in_features], float32: the
writer's own dequantized weights). Exit status 0 if every quantized linear matches, 1 otherwise.

Reference data written next to each fixture (`reference_dequant.safetensors`)
---------------------------------------------------------------------------
Produced by gptqmodel 7.6.0, backend BACKEND.GPTQ_TORCH (kernel class
gptqmodel.nn_modules.qlinear.torch.TorchLinear), loaded on CPU with dtype float16:

* `<module>.weight` (float32, [out, in]): gptqmodel's own dequantize path
  (`TorchLinear.dequantize_weight`, called unbound, i.e. without the torch.compile wrapper) run
  on the loaded module, after gptqmodel's own v1->v2 zero-point conversion at load time, with
  the module's fp16 `scales` viewed as float32 for the call. scale(fp16) * (q - z) is exact in
  float32, so this is the exact value of W = scales[g_idx] * (q - z). gptqmodel's native fp16
  result is the round-to-nearest fp16 of it (the script asserts this).
  With `--ref-dtype float16` the native fp16 result is stored instead (smaller files).
* `reference_input` (int64 [2, 16], torch.Generator seed 1, ids in [0, vocab)).
* `reference_logits` (float32 [2, 16, vocab]): logits of the gptqmodel-loaded model for
  `reference_input`; computed in float16 on CPU (TorchLinear does not accept float32), so compare
  with a loose tolerance (~1e-2).
The file's safetensors metadata key `info` (a JSON string) repeats the producer, backend and dtypes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES_DIR = REPO_ROOT / "tests" / "fixtures"

# name -> (bits, group_size, desc_act, sym)
CONFIGS = {
    "gptqmodel_w4_g32": (4, 32, False, False),
    "gptqmodel_w3_g32": (3, 32, False, False),
    "gptqmodel_w2_g32_actorder": (2, 32, True, False),
}

# Files of gptqmodel's save that are needed to reload the checkpoint (tokenizer files are needed:
# GPTQModel.load always builds a tokenizer and fails without one). generation_config.json and
# quant_log.csv are dropped.
KEEP_FILES = ("model.safetensors", "config.json", "quantize_config.json", "tokenizer.json",
              "tokenizer_config.json")
REF_FILE = "reference_dequant.safetensors"

VOCAB = 128
N_CALIB, CALIB_LEN = 16, 64
REF_INPUT_SHAPE = (2, 16)
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")

# Output rows of model.layers.0.self_attn.q_proj forced to one sign so that gptqmodel produces zero
# points equal to 0 (all-positive row: xmin=0 -> z=0) and to maxq (all-negative row: xmax=0 ->
# z=maxq) in every group of that row. z=0 is the case where a word-wise "-0x11111111" v1 encoding
# and a per-field "(z-1) & mask" encoding differ. Rows 7/15 are the top field of a qzeros word for
# 4/2 bits; rows 10/21 are the 3-bit fields that straddle two int32 words.
POSITIVE_ROWS = (0, 1, 7, 10, 15, 21)
NEGATIVE_ROWS = (2, 11)


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# tiny model + tokenizer
# --------------------------------------------------------------------------------------------
def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for i in range(len(SPECIAL_TOKENS), vocab_size):
        vocab[f"t{i}"] = i
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def build_source_model(dst: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).to(torch.float16)
    with torch.no_grad():
        w = model.model.layers[0].self_attn.q_proj.weight
        for r in POSITIVE_ROWS:
            w[r] = w[r].abs() + 0.05
        for r in NEGATIVE_ROWS:
            w[r] = -(w[r].abs() + 0.05)
    model.save_pretrained(dst)
    build_tokenizer(VOCAB).save_pretrained(dst)


def calibration_data() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(len(SPECIAL_TOKENS), VOCAB, (N_CALIB, CALIB_LEN), generator=g)
    return [{"input_ids": row.tolist(), "attention_mask": [1] * CALIB_LEN} for row in ids]


def reference_input(vocab_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab_size, REF_INPUT_SHAPE, generator=g, dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# gptqmodel load + dequant
# --------------------------------------------------------------------------------------------
def _scales_dtype(ckpt: Path) -> torch.dtype:
    first = next(iter(raw_scales(ckpt).values()), None)
    return torch.bfloat16 if first is not None and first.dtype == torch.bfloat16 else torch.float16


def load_with_gptqmodel(ckpt: Path):
    """GPTQModel.load on CPU with the pure-torch kernel. Returns (qmodel, model dtype)."""
    from gptqmodel import BACKEND, GPTQModel

    dtype = _scales_dtype(ckpt)
    qmodel = GPTQModel.load(str(ckpt), backend=BACKEND.GPTQ_TORCH, device="cpu", dtype=dtype)
    return qmodel, dtype


def raw_scales(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        if f.name == REF_FILE:
            continue
        with safe_open(str(f), framework="pt") as r:
            for k in r.keys():
                if k.endswith(".scales"):
                    out[k[: -len(".scales")]] = r.get_tensor(k)
    return out


@torch.no_grad()
def gptqmodel_dequant(qmodel) -> dict[str, dict]:
    """Per quantized linear: exact fp32 dequant and native dequant, both [out, in], via gptqmodel."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    res = {}
    for name, mod in qmodel.model.named_modules():
        if not isinstance(mod, BaseQuantLinear):
            continue
        if not hasattr(type(mod), "dequantize_weight"):
            raise RuntimeError(f"{name}: kernel {type(mod).__name__} has no dequantize_weight()")
        mod.eval()
        # Unbound call: TorchLinear.optimize() replaces the instance attribute with a torch.compile
        # wrapper; the class method is the same code without inductor.
        native = type(mod).dequantize_weight(mod).detach().clone()
        scales = mod.scales
        try:
            mod.scales = scales.to(torch.float32)
            exact = type(mod).dequantize_weight(mod).detach().to(torch.float32).clone()
        finally:
            mod.scales = scales
        g_idx = mod.g_idx.long()
        scale_full = scales.to(torch.float32)[g_idx]  # [in, out]
        res[name] = {
            "exact": exact.t().contiguous(),
            "native": native.t().contiguous(),
            "scale_full": scale_full.t().contiguous(),
            "kernel": type(mod).__name__,
            "qzero_format": mod.qzero_format() if hasattr(mod, "qzero_format") else None,
            "scales": scales.detach().clone(),
        }
    return res


# --------------------------------------------------------------------------------------------
# Independent decoder of the on-disk layout (written from the format description, used only to
# cross-check gptqmodel and to count where a per-field zero-point decode would go wrong).
# --------------------------------------------------------------------------------------------
def _unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unpack int32 words along `dim` (0: qweight rows, 1: qzeros cols) into codes (int64)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    if dim == 1:
        w = w.t()
    if bits in (2, 4, 8):
        per = 32 // bits
        codes = torch.stack([(w >> (bits * j)) & ((1 << bits) - 1) for j in range(per)], dim=1)
        codes = codes.reshape(w.shape[0] * per, w.shape[1])
    elif bits == 3:
        # 32 codes in 3 consecutive words = one little-endian 96-bit stream: code j occupies stream
        # bits [3j, 3j+3), stream bit p is bit p % 32 of word p // 32.
        blocks = w.reshape(-1, 3, w.shape[1])
        codes = torch.zeros(blocks.shape[0], 32, w.shape[1], dtype=torch.int64)
        for j in range(32):
            for b in range(3):
                pos = 3 * j + b
                codes[:, j] |= ((blocks[:, pos // 32] >> (pos % 32)) & 1) << b
        codes = codes.reshape(-1, w.shape[1])
    else:
        raise NotImplementedError(bits)
    return codes.t() if dim == 1 else codes


def independent_check(ckpt: Path, bits: int, deq: dict) -> dict:
    """Decode model.safetensors with the documented v1 layout; compare with gptqmodel."""
    from safetensors.torch import load_file

    sd = load_file(str(ckpt / "model.safetensors"))
    magic = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}
    stats = {"zero_fields": 0, "zero_is_0": 0, "zero_is_maxq": 0, "perfield_decode_wrong": 0,
             "mismatch_modules": []}
    maxq = (1 << bits) - 1
    for name, d in deq.items():
        qw, qz = sd[f"{name}.qweight"], sd[f"{name}.qzeros"]
        scales, g_idx = sd[f"{name}.scales"].float(), sd[f"{name}.g_idx"].long()
        q = _unpack(qw, bits, 0)  # [in, out]
        stored = _unpack(qz, bits, 1)  # [groups, out]
        if bits == 3:  # per-field v1 -> v2 (+1 mod 8)
            z = (stored + 1) & maxq
            z_perfield = z
        else:  # word-wise v1 -> v2: add the packed 1-pattern to each int32 word (mod 2**32)
            qz_v2 = ((qz.to(torch.int64) + magic[bits]) & 0xFFFFFFFF)
            z = _unpack(qz_v2, bits, 1)
            z_perfield = (stored + 1) & maxq
        w = (scales[g_idx] * (q - z[g_idx]).float()).t()
        if not torch.equal(w, d["exact"]):
            stats["mismatch_modules"].append(name)
        stats["zero_fields"] += z.numel()
        stats["zero_is_0"] += int((z == 0).sum())
        stats["zero_is_maxq"] += int((z == maxq).sum())
        stats["perfield_decode_wrong"] += int((z_perfield != z).sum())
    return stats


# --------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------
def save_reference(dst: Path, deq: dict, logits: torch.Tensor, ref_in: torch.Tensor, dtype: torch.dtype,
                   ref_dtype: str) -> None:
    import gptqmodel
    from safetensors.torch import save_file

    tensors = {}
    for name, d in deq.items():
        w = d["exact"] if ref_dtype == "float32" else d["native"].to(torch.float16)
        tensors[f"{name}.weight"] = w.contiguous()
    tensors["reference_input"] = ref_in.contiguous()
    tensors["reference_logits"] = logits.to(torch.float32).contiguous()
    kernels = sorted({d["kernel"] for d in deq.values()})
    meta = {
        "producer": f"gptqmodel {gptqmodel.__version__}",
        "torch": torch.__version__,
        "backend": "BACKEND.GPTQ_TORCH",
        "kernel": ",".join(kernels),
        "load_dtype": str(dtype),
        "weights": ("exact float32: TorchLinear.dequantize_weight with fp16 scales viewed as float32"
                    if ref_dtype == "float32" else "native fp16 TorchLinear.dequantize_weight output"),
        "weights_layout": "[out_features, in_features]",
        "logits": f"gptqmodel-loaded model forward on CPU in {dtype}, stored as float32",
        "reference_input": "torch.Generator().manual_seed(1); randint(0, vocab, (2, 16)), int64",
    }
    # One metadata key holding sorted JSON: safetensors' metadata map has no stable order.
    save_file(tensors, str(dst / REF_FILE), metadata={"info": json.dumps(meta, sort_keys=True)})
    os.chmod(dst / REF_FILE, 0o644)


def generate_one(name: str, spec: tuple, out_root: Path, work: Path, ref_dtype: str) -> None:
    from gptqmodel import GPTQModel, QuantizeConfig

    bits, gs, desc_act, sym = spec
    src = work / "src"
    if not src.exists():
        build_source_model(src)
    qcfg = QuantizeConfig(bits=bits, group_size=gs, desc_act=desc_act, sym=sym, format="gptq",
                          pack_dtype=torch.int32, offload_to_disk=False)
    log(f"[{name}] quantizing: bits={bits} group_size={gs} desc_act={desc_act} sym={sym}")
    qmodel = GPTQModel.load(str(src), qcfg, dtype=torch.float16)
    qmodel.quantize(calibration_data(), batch_size=1)
    saved = work / f"saved_{name}"
    qmodel.save(str(saved))
    del qmodel

    dst = out_root / name
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for fn in KEEP_FILES:
        if (saved / fn).exists():
            shutil.copy2(saved / fn, dst / fn)
    log(f"[{name}] saved files: {sorted(p.name for p in saved.iterdir())}; kept: "
        f"{sorted(p.name for p in dst.iterdir())}")

    # Reload exactly what is committed and record gptqmodel's own view of it.
    qmodel, dtype = load_with_gptqmodel(dst)
    deq = gptqmodel_dequant(qmodel)
    file_scales = raw_scales(dst)
    for mname, d in deq.items():
        if not torch.equal(d["scales"].float(), file_scales[mname].float()):
            raise RuntimeError(f"{mname}: gptqmodel's loaded scales differ from the file's scales")
        # native fp16 result must be the correctly rounded exact value
        if d["native"].dtype == torch.float16 and not torch.equal(d["native"], d["exact"].to(torch.float16)):
            raise RuntimeError(f"{mname}: native fp16 dequant is not round(exact)")
    ref_in = reference_input(VOCAB)
    with torch.no_grad():
        logits = qmodel.model(input_ids=ref_in).logits
    cfg = json.loads((dst / "config.json").read_text())
    lm_head_quantized = "lm_head" in deq
    save_reference(dst, deq, logits, ref_in, dtype, ref_dtype)
    stats = independent_check(dst, bits, deq)
    log(f"[{name}] quantized linears: {len(deq)} (kernel {sorted({d['kernel'] for d in deq.values()})}, "
        f"qzero_format after load {sorted({str(d['qzero_format']) for d in deq.values()})}); "
        f"lm_head quantized: {lm_head_quantized}; "
        f"quantization_config in config.json: {sorted(cfg.get('quantization_config', {}))}")
    log(f"[{name}] independent decode: {stats}")
    if stats["mismatch_modules"]:
        raise RuntimeError(f"independent decoder disagrees with gptqmodel on {stats['mismatch_modules']}")
    del qmodel


def cmd_generate(args) -> int:
    import gptqmodel

    log(f"gptqmodel {gptqmodel.__version__}, torch {torch.__version__}")
    out_root = Path(args.out_root).resolve()
    names = args.only or list(CONFIGS)
    cwd = os.getcwd()
    work = Path(tempfile.mkdtemp(prefix="gptq_fixture_"))
    try:
        os.chdir(work)  # gptqmodel writes ./logs/ into the working directory
        for name in names:
            generate_one(name, CONFIGS[name], out_root, work, args.ref_dtype)
    finally:
        os.chdir(cwd)
        if not args.keep_tmp:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"temp dir kept: {work}")
    total = 0
    for name in CONFIGS:
        d = out_root / name
        if d.exists():
            size = sum(p.stat().st_size for p in d.iterdir())
            total += size
            log(f"{d.relative_to(out_root.parent) if out_root.parent in d.parents else d}: {size} bytes")
    log(f"total: {total} bytes")
    return 0


# --------------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------------
def cmd_check(args) -> int:
    import gptqmodel
    from safetensors import safe_open

    src = Path(args.check).resolve()
    ref_path = src / REF_FILE
    if not ref_path.is_file():
        log(f"error: {ref_path} not found")
        return 1
    ref = {}
    with safe_open(str(ref_path), framework="pt") as r:
        for k in r.keys():
            ref[k] = r.get_tensor(k)

    log(f"gptqmodel {gptqmodel.__version__}, torch {torch.__version__}, backend BACKEND.GPTQ_TORCH, CPU")
    cwd = os.getcwd()
    work = Path(tempfile.mkdtemp(prefix="gptq_check_"))
    try:
        os.chdir(work)  # gptqmodel writes ./logs/ into the working directory
        ckpt = work / "ckpt"
        shutil.copytree(src, ckpt, ignore=shutil.ignore_patterns(REF_FILE))
        if not (ckpt / "tokenizer.json").exists() and not (ckpt / "tokenizer_config.json").exists():
            # GPTQModel.load always loads a tokenizer; give it a tiny one (in the copy only).
            vocab = json.loads((ckpt / "config.json").read_text()).get("vocab_size", VOCAB)
            build_tokenizer(vocab).save_pretrained(ckpt)
            log("note: DIR has no tokenizer; a tiny WordLevel tokenizer was added to a temp copy")
        try:
            qmodel, dtype = load_with_gptqmodel(ckpt)
            deq = gptqmodel_dequant(qmodel)
        except Exception as e:  # noqa: BLE001 - report whatever gptqmodel raises
            log("gptqmodel could not load/dequantize the checkpoint:")
            traceback.print_exc()
            log(f"error: {type(e).__name__}: {e}")
            return 1

        ok = True
        file_scales = raw_scales(ckpt)
        log(f"{'module':48s} {'max|diff|':>12s} {'max|diff|/scale':>16s}  status")
        for name, d in deq.items():
            key = f"{name}.weight"
            if name in file_scales and not torch.equal(d["scales"].float(), file_scales[name].float()):
                log(f"warning: {name}: scales changed when gptqmodel loaded them ({file_scales[name].dtype} "
                    f"file -> {d['scales'].dtype} module)")
            if key not in ref:
                log(f"{name:48s} {'-':>12s} {'-':>16s}  MISSING in {REF_FILE}")
                ok = False
                continue
            theirs = ref[key].to(torch.float32)
            mine = d["exact"]
            if theirs.shape != mine.shape:
                log(f"{name:48s} shape {tuple(theirs.shape)} != gptqmodel {tuple(mine.shape)}  FAIL")
                ok = False
                continue
            diff = (theirs - mine).abs()
            rel = diff / d["scale_full"].abs().clamp_min(torch.finfo(torch.float32).tiny)
            max_abs, max_rel = float(diff.max()), float(rel.max())
            good = max_abs == 0.0 or max_rel <= 1e-6
            ok &= good
            extra = ""
            if not good:
                bad = int((rel > 1e-6).sum())
                extra = f" ({bad}/{diff.numel()} elements off; max diff = {max_rel:.3f} scales)"
            log(f"{name:48s} {max_abs:12.3e} {max_rel:16.3e}  {'ok' if good else 'FAIL'}{extra}")

        quantized = set(deq)
        for key in sorted(ref):
            if key.endswith(".weight") and key[: -len(".weight")] not in quantized:
                log(f"{key}: in {REF_FILE} but not a quantized linear for gptqmodel  FAIL")
                ok = False

        if "reference_input" in ref and "reference_logits" in ref:
            with torch.no_grad():
                logits = qmodel.model(input_ids=ref["reference_input"].long()).logits.float()
            theirs = ref["reference_logits"].float()
            if theirs.shape == logits.shape:
                log(f"logits (info only, gptqmodel runs in {dtype}): max|diff| = "
                    f"{float((theirs - logits).abs().max()):.3e}")
            else:
                log(f"logits (info only): shape {tuple(theirs.shape)} != gptqmodel {tuple(logits.shape)}")
        log("PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# try-load: does gptqmodel accept a checkpoint at all?
# --------------------------------------------------------------------------------------------
def cmd_try_load(args) -> int:
    """Load DIR with gptqmodel (a temporary copy, with a tiny tokenizer if DIR has none). Prints
    `loaded` (exit 0) or `refused: <gptqmodel's message>` (exit 3). A merged LoTA-QAF checkpoint with
    fractional zero points must be refused; an integer-only one must load."""
    import gptqmodel

    src = Path(args.try_load).resolve()
    log(f"gptqmodel {gptqmodel.__version__}: loading {src}")
    cwd = os.getcwd()
    work = Path(tempfile.mkdtemp(prefix="gptq_try_"))
    try:
        os.chdir(work)
        ckpt = work / "ckpt"
        shutil.copytree(src, ckpt)
        if not (ckpt / "tokenizer.json").exists() and not (ckpt / "tokenizer_config.json").exists():
            build_tokenizer(json.loads((ckpt / "config.json").read_text()).get("vocab_size", VOCAB)).save_pretrained(ckpt)
        try:
            load_with_gptqmodel(ckpt)
        except Exception as e:  # noqa: BLE001 - report what gptqmodel raises
            log(f"refused: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return 3
        log("loaded")
        return 0
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", metavar="DIR", help="compare DIR/reference_dequant.safetensors with gptqmodel")
    p.add_argument("--try-load", metavar="DIR", help="only load DIR with gptqmodel: `loaded` (0) or `refused` (3)")
    p.add_argument("--out-root", default=str(FIXTURES_DIR), help="where fixture dirs are written")
    p.add_argument("--only", nargs="+", choices=sorted(CONFIGS), help="generate only these fixtures")
    p.add_argument("--ref-dtype", choices=("float32", "float16"), default="float32",
                   help="dtype of the stored reference weights (float32: exact; float16: gptqmodel native)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp working dir (debugging)")
    args = p.parse_args(argv)
    if args.check:
        return cmd_check(args)
    if args.try_load:
        return cmd_try_load(args)
    return cmd_generate(args)


if __name__ == "__main__":
    sys.exit(main())
