"""A Hugging Face model read from its safetensors shards one decoder layer at a time.

    ShardedSource(directory)       the tensor index of `model.safetensors` or `model.safetensors.index.json`
    .skeleton(dtype, device)       the model with empty (meta) decoder layers; what runs before layer 0
                                   (embeddings, rotary tables) and after the last (norm, lm_head) is real
    .layer(i, skeleton, dtype, device)  decoder layer i, built from the config, its weights read from the shards

Reading a tensor maps its shard and copies only that tensor's bytes (safetensors' `safe_open`), so
the resident memory is one layer and the skeleton, whatever the number of layers. What streamed
quantization writes is io/checkpoint.py's ShardedCheckpointWriter.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from ..errors import LotaqafError

LAYER_PREFIX = "model.layers."


class ShardedSource:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        index = self.dir / "model.safetensors.index.json"
        try:
            if index.is_file():
                self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            else:
                from safetensors import safe_open

                with safe_open(str(self.dir / "model.safetensors"), framework="pt") as f:
                    self.weight_map = {k: "model.safetensors" for k in f.keys()}  # noqa: SIM118 (not a dict)
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
            raise LotaqafError(f"cannot read the safetensors index of {self.dir}: {str(e)[:160]}") from None
        missing = sorted({f for f in self.weight_map.values() if not (self.dir / f).is_file()})
        if missing:
            raise LotaqafError(f"{self.dir} is incomplete: shard {missing[0]} is missing")
        from transformers import AutoConfig

        self.config = AutoConfig.from_pretrained(str(self.dir))

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def _read(self, names: list[str], dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
        """The named tensors, grouped by shard; each shard is mapped only while its tensors are copied."""
        from safetensors import SafetensorError, safe_open

        by_file: dict[str, list[str]] = defaultdict(list)
        for n in names:
            by_file[self.weight_map[n]].append(n)
        out = {}
        for fname, keys in by_file.items():
            try:
                with safe_open(str(self.dir / fname), framework="pt") as f:
                    for k in keys:
                        t = f.get_tensor(k)
                        out[k] = t.to(device, dtype if t.is_floating_point() else t.dtype)
            except (SafetensorError, OSError) as e:
                raise LotaqafError(f"cannot read {self.dir / fname}: corrupted or truncated ({str(e)[:120]})") \
                    from None
        return out

    def _layer_names(self, i: int) -> list[str]:
        prefix = f"{LAYER_PREFIX}{i}."
        return [k for k in self.weight_map if k.startswith(prefix)]

    def skeleton(self, dtype: torch.dtype, device) -> nn.Module:
        """The model with every decoder layer on the meta device and everything else loaded."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        layers = model.model.layers
        model.model.layers = nn.ModuleList()           # materialize all but the decoder layers
        model.to_empty(device=device)
        model.model.layers = layers
        rest = [k for k in self.weight_map if not k.startswith(LAYER_PREFIX)]
        state = self._read(rest, dtype, device)
        if getattr(self.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        missing = [k for k in missing if not k.startswith(LAYER_PREFIX)
                   and not (k == "lm_head.weight" and self.config.tie_word_embeddings)]
        if missing or unexpected:
            raise LotaqafError(f"{self.dir}: weights do not match config.json (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
        if self.config.tie_word_embeddings:
            model.tie_weights()
        rebuild_rotary(model, device)
        return model.eval()

    def layer(self, i: int, skeleton: nn.Module, dtype: torch.dtype, device) -> nn.Module:
        """Decoder layer ``i`` (a new module shaped like the skeleton's) with its weights loaded."""
        template = skeleton.model.layers[i]
        with torch.device("meta"):
            layer = type(template)(skeleton.config, layer_idx=i).to(dtype)
        prefix = f"{LAYER_PREFIX}{i}."
        state = {k[len(prefix):]: v for k, v in self._read(self._layer_names(i), dtype, device).items()}
        missing, unexpected = layer.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise LotaqafError(f"{self.dir}: layer {i} does not match config.json (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
        return layer.eval()




def rebuild_rotary(model: nn.Module, device) -> None:
    """A model built on the meta device: its non-persistent buffers (the rotary inverse frequencies)
    are in no file, so build them anew on ``device``."""
    rotary = model.model.rotary_emb
    with torch.device(device):
        model.model.rotary_emb = type(rotary)(config=model.config)
