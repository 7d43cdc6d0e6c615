"""A tiny Hugging Face model directory WITH a tokenizer (the smoke model has none), for tests that
drive file-based calibration, JSONL training data, MMLU and GSM8K through the command line."""

from pathlib import Path

WORDS = ("the model reads a question and writes an answer about water rivers stars cells numbers "
         "history music trees light energy markets cities because so then first next finally").split()


def corpus(n_lines: int = 64) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12 + i % 9)) + "." for i in range(n_lines)]


def tiny_tokenizer():
    """A 256-token byte-level BPE tokenizer trained on :func:`corpus`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:120])
    tok.train_from_iterator(corpus() + ["Question: 1 + 2 = ? A. B. C. D. Answer: #### 3 0123456789"], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def tiny_model_dir(path: Path) -> Path:
    """The smoke model's weights (vocab 256) saved with a 256-token BPE tokenizer: a local HF directory."""
    from lotaqaf_cli.io.models import smoke_model

    path.mkdir(parents=True, exist_ok=True)
    model = smoke_model(seed=0)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(str(path))
    tiny_tokenizer().save_pretrained(str(path))
    return path


def random_model_dir(path: Path, layers: int, hidden: int = 1024, intermediate: int = 2816,
                     shard_mb: float = 200, heads: int | None = None, kv_heads: int | None = None,
                     head_dim: int = 64, dtype: str = "float32") -> Path:
    """A random-weight Llama (vocab 256, the tiny tokenizer; heads of 64 by default) saved as
    safetensors shards of about ``shard_mb`` MB, written layer by layer so that making it never holds
    more than one layer. Llama-3.1-8B's shape: hidden 4096, intermediate 14336, heads 32, kv_heads 8,
    head_dim 128."""
    import json

    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=intermediate,
                      num_attention_heads=heads or hidden // head_dim,
                      num_key_value_heads=kv_heads or hidden // (2 * head_dim), head_dim=head_dim,
                      vocab_size=256, max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, architectures=["LlamaForCausalLM"])
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    pending: dict = {"model.embed_tokens.weight": (torch.randn(256, hidden) * 0.02).to(getattr(torch, dtype)),
                     "model.norm.weight": torch.ones(hidden, dtype=getattr(torch, dtype))}
    shards: list[dict] = []
    for i in range(layers):
        layer = LlamaDecoderLayer(cfg, layer_idx=i).to(getattr(torch, dtype))
        pending.update({f"model.layers.{i}.{k}": v.detach().clone() for k, v in layer.state_dict().items()})
        if sum(t.numel() * t.element_size() for t in pending.values()) >= shard_mb * 2**20 or i == layers - 1:
            shards.append(dict.fromkeys(pending, len(shards)))
            save_file(pending, str(path / f"shard-{len(shards) - 1}.safetensors"))
            pending = {}
    n = len(shards)
    weight_map = {}
    for k, s in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        (path / f"shard-{k}.safetensors").rename(path / name)
        weight_map.update(dict.fromkeys(s, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(str(path))
    tiny_tokenizer().save_pretrained(str(path))
    return path
