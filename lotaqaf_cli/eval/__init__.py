"""Evaluation through lm-eval and the fast scorer: MMLU, GSM8K and what they share."""
