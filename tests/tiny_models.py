"""A tiny Hugging Face model directory WITH a tokenizer (the smoke model has none), for tests that
drive file-based calibration, JSONL training data, MMLU and GSM8K through the command line."""

from pathlib import Path

WORDS = ("the model reads a question and writes an answer about water rivers stars cells numbers "
         "history music trees light energy markets cities because so then first next finally").split()


def corpus(n_lines: int = 64) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12 + i % 9)) + "." for i in range(n_lines)]


def tiny_model_dir(path: Path) -> Path:
    """The smoke model's weights (vocab 256) saved with a 256-token BPE tokenizer: a local HF directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from lotaqaf_cli.io.models import smoke_model

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:120])
    tok.train_from_iterator(corpus() + ["Question: 1 + 2 = ? A. B. C. D. Answer: #### 3 0123456789"], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    path.mkdir(parents=True, exist_ok=True)
    model = smoke_model(seed=0)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(str(path))
    fast.save_pretrained(str(path))
    return path
