"""GSM8K through lm-eval's own task on a local file: the generated text equals an independent greedy
generation, and the exact match equals our own reading of the number after "####"."""

import json
import re

import pytest
import torch

from lotaqaf_cli.errors import LotaqafError
from lotaqaf_cli.eval.gsm8k import evaluate_gsm8k, local_task

ROWS = [  # hand-written, GSM8K layout (not GSM8K data)
    {"question": "Tom has 3 apples and buys 2 more. How many apples does he have now?",
     "answer": "He has 3 + 2 = <<3+2=5>>5 apples.\n#### 5"},
    {"question": "A box holds 12 pencils. How many pencils are in 3 boxes?",
     "answer": "3 boxes hold 3 * 12 = <<3*12=36>>36 pencils.\n#### 36"},
]
UNTIL = ("Question:", "</s>", "<|im_end|>")


def _write(tmp_path, rows):
    f = tmp_path / "gsm8k_test.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def test_local_task_rejects_bad_rows(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"question": "q"}\n')
    with pytest.raises(LotaqafError, match="'question' and 'answer'"):
        local_task(f, tmp_path / "tasks")
    with pytest.raises(LotaqafError, match="not found"):
        local_task(tmp_path / "missing.jsonl", tmp_path / "tasks")


@pytest.mark.slow
def test_gsm8k_local_matches_independent_greedy(tmp_path, smollm2_loaded):
    model, tok = smollm2_loaded.model.eval(), smollm2_loaded.tokenizer
    res = evaluate_gsm8k(model, tok, data_file=_write(tmp_path, ROWS), tasks_dir=tmp_path / "tasks",
                         max_gen_toks=24, batch_size=1, chat_template=True)
    assert res["n"] == len(ROWS) and res["num_fewshot"] == 0
    matches = []
    for row, sample in zip(ROWS, res["samples"], strict=True):
        prompt = tok.apply_chat_template([{"role": "user", "content": f"Question: {row['question']}\nAnswer:"}],
                                         tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
        text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=False)
        for stop in UNTIL:
            text = text.split(stop)[0]
        assert text.strip() and sample["generated"] == text
        m = re.search(r"#### (\-?[0-9\.\,]+)", text)
        target = row["answer"].split("#### ")[-1]
        matches.append(float(m is not None and m.group(1).replace(",", "").rstrip(".") == target))
        assert sample["exact_match"] == matches[-1]
    assert res["exact_match"] == pytest.approx(sum(matches) / len(matches))
