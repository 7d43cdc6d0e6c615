"""lotaqaf: lossless ternary adaptation (LoTA-QAF) for quantized language models."""

__version__ = "0.1.0"
