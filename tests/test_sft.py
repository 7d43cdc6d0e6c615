"""SFT data: record formats, masking/truncation, loaders, deterministic resumable batches."""

import json

import pytest
import torch

from lotaqaf_cli.data.sft import (
    IGNORE_INDEX,
    SFTBatches,
    load_records,
    pad_token_id,
    self_distill_records,
    split_prompt_target,
    to_messages,
    tokenize_example,
    tokenize_ids,
    tokenize_record,
    tokenize_records,
)
from lotaqaf_cli.errors import LotaqafError


def _check_masking(ex, n_prompt):
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels)
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert IGNORE_INDEX not in labels[n_prompt:]


class CharTok:
    """A tiny character tokenizer without a chat template (bos=1, eos=2)."""

    chat_template = None
    eos_token_id = 2
    pad_token_id = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}


class TemplateTok(CharTok):
    """CharTok with a ChatML-like template, for fast template-path tests."""

    chat_template = "chatml"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"<{m['role']}>{m['content']}|" for m in messages)
        if add_generation_prompt:
            text += "<assistant>"
        return text if not tokenize else self(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- records


def test_to_messages_both_formats():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}]
    assert to_messages({"messages": msgs}) == msgs
    assert to_messages({"instruction": "Add.", "input": "2+2", "output": "4"}) == [
        {"role": "user", "content": "Add.\n\n2+2"}, {"role": "assistant", "content": "4"}]
    assert to_messages({"instruction": "Say hi.", "input": "", "output": "hi"})[0]["content"] == "Say hi."
    assert to_messages({"instruction": "Say hi.", "output": "hi"})[0]["content"] == "Say hi."


@pytest.mark.parametrize("bad", [
    {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}]},
    {"messages": [{"role": "assistant", "content": "a"}]},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
    {"instruction": "q", "input": "", "output": ""},
    {"question": "q", "answer": "a"},
    ["not", "a", "dict"],
])
def test_to_messages_rejects(bad):
    with pytest.raises(LotaqafError):
        to_messages(bad)


# --------------------------------------------------------------------------- masking / truncation


def test_tokenize_ids_masking_smoke_layout():
    ex = tokenize_ids([5, 6, 7], [8, 9, 2], source_len=16, target_len=16)
    assert ex == {"input_ids": [5, 6, 7, 8, 9, 2], "labels": [-100, -100, -100, 8, 9, 2]}
    assert tokenize_record(None, {"prompt_ids": [5, 6, 7], "answer_ids": [8, 9, 2]}, 16, 16) == ex


def test_truncation_keeps_prompt_end_and_target_start():
    ex = tokenize_ids(list(range(10, 20)), list(range(100, 110)), source_len=4, target_len=3)
    assert ex["input_ids"] == [16, 17, 18, 19, 100, 101, 102]
    _check_masking(ex, 4)
    ex0 = tokenize_ids([1, 2, 3], [4, 5], source_len=0, target_len=8)
    assert ex0 == {"input_ids": [4, 5], "labels": [4, 5]}
    with pytest.raises(ValueError):
        tokenize_ids([1], [2], source_len=4, target_len=0)


def test_plain_tokenizer_prompt_newline_answer_eos():
    tok = CharTok()
    msgs = [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"}]
    prompt, target = split_prompt_target(tok, msgs)
    assert prompt == [1, ord("a"), ord("b"), ord("\n")]
    assert target == [ord("c"), ord("d"), 2]
    _check_masking(tokenize_example(tok, msgs, 64, 64), len(prompt))


def test_template_split_matches_full_rendering_fake():
    tok = TemplateTok()
    msgs = [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "xyz"}]
    prompt, target = split_prompt_target(tok, msgs)
    assert prompt + target == tok.apply_chat_template(msgs, tokenize=True)
    assert bytes(target).decode() == "xyz|"  # content + end-of-turn as rendered
    ex = tokenize_example(tok, msgs, source_len=3, target_len=2)
    assert ex["input_ids"] == prompt[-3:] + target[:2]
    _check_masking(ex, 3)


def test_text_record_needs_tokenizer():
    with pytest.raises(LotaqafError, match="tokenizer"):
        tokenize_record(None, {"instruction": "q", "output": "a"}, 8, 8)


# --------------------------------------------------------------------------- loaders


def test_jsonl_loader_good(tmp_path):
    p = tmp_path / "train.jsonl"
    lines = [{"instruction": f"Q{i}", "input": "", "output": f"A{i}"} for i in range(6)]
    lines.append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    p.write_text("\n".join(json.dumps(x) for x in lines[:3]) + "\n\n" + "\n".join(json.dumps(x) for x in lines[3:]))
    recs = load_records("jsonl", str(p))
    assert len(recs) == 7 and all("messages" in r for r in recs)
    assert recs[0]["messages"][1]["content"] == "A0" and recs[-1]["messages"][-1]["content"] == "yo"
    a = load_records("jsonl", str(p), n_samples=4, seed=3)
    assert a == load_records("jsonl", str(p), n_samples=4, seed=3) and len(a) == 4
    assert a != load_records("jsonl", str(p), n_samples=4, seed=4)
    assert len(load_records("jsonl", str(p), n_samples=50, seed=0)) == 7


def test_jsonl_loader_bad(tmp_path):
    with pytest.raises(LotaqafError, match="does not exist"):
        load_records("jsonl", str(tmp_path / "missing.jsonl"))
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n{not json\n")
    with pytest.raises(LotaqafError, match=r"bad\.jsonl:2: invalid JSON") as e:
        load_records("jsonl", str(p))
    assert "\n" not in str(e.value)
    p.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n\n" + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(LotaqafError, match=r"bad\.jsonl:3: .*instruction"):
        load_records("jsonl", str(p))
    p.write_text("\n\n")
    with pytest.raises(LotaqafError, match="no records"):
        load_records("jsonl", str(p))


def test_sources_refuse_mmlu_and_unknown(tmp_path):
    with pytest.raises(LotaqafError, match="MMLU"):
        load_records("alpaca", "cais/mmlu")
    p = tmp_path / "mmlu_dev.jsonl"
    p.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    with pytest.raises(LotaqafError, match="MMLU"):
        load_records("jsonl", str(p))
    with pytest.raises(LotaqafError, match="unknown"):
        load_records("c4")


def test_hub_unreachable_is_one_clear_line():
    # conftest sets HF_HUB_OFFLINE / HF_DATASETS_OFFLINE; the id does not exist in any cache
    with pytest.raises(LotaqafError) as e:
        load_records("alpaca", "lotaqaf-test/no-such-dataset", n_samples=4)
    msg = str(e.value)
    assert "\n" not in msg and "unreachable" in msg and "data=self_distill" in msg and "data=jsonl" in msg


def test_hub_loader_local_file(tmp_path):
    p = tmp_path / "gsm.jsonl"
    p.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": f"r\n#### {i}"}) for i in range(5)) + "\n")
    recs = load_records("gsm8k", str(p), n_samples=3, seed=0)
    assert len(recs) == 3 and all(r["messages"][-1]["content"].startswith("r\n#### ") for r in recs)
    assert all([m["role"] for m in r["messages"]] == ["system", "user", "assistant"] for r in recs)


# --------------------------------------------------------------------------- self-distillation


def test_self_distill_smoke(smoke):
    recs = self_distill_records(smoke, None, n_samples=5, max_new_tokens=6, seed=0)
    assert len(recs) == 5
    for r in recs:
        assert r["prompt_ids"] and 1 <= len(r["answer_ids"]) <= 6
        ex = tokenize_record(None, r, source_len=64, target_len=64)
        _check_masking(ex, len(r["prompt_ids"]))
    assert recs == self_distill_records(smoke, None, n_samples=5, max_new_tokens=6, seed=0)


# --------------------------------------------------------------------------- batches


def _examples(n=11):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        lp, lt = 1 + i % 4, 1 + (i * 3) % 5
        ids = torch.randint(3, 256, (lp + lt,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * lp + ids[lp:]})
    return out


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_batches_padding_and_epochs():
    exs = _examples(11)
    it = SFTBatches(exs, batch_size=4, seed=1, pad_id=7)
    b = next(it)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape and b["input_ids"].shape[0] == 4
    for r, i in enumerate(it.indices_at(0)):
        L = len(exs[i]["input_ids"])
        assert b["input_ids"][r, :L].tolist() == exs[i]["input_ids"]
        assert b["labels"][r, :L].tolist() == exs[i]["labels"]
        assert b["attention_mask"][r].tolist() == [1] * L + [0] * (b["input_ids"].shape[1] - L)
        assert (b["input_ids"][r, L:] == 7).all() and (b["labels"][r, L:] == IGNORE_INDEX).all()
    # seamless epochs: the stream of the first 11 items is a permutation, then the next epoch starts
    stream = [i for s in range(6) for i in it.indices_at(s)]
    assert sorted(stream[:11]) == list(range(11)) and sorted(stream[11:22]) == list(range(11))
    assert stream[:11] != stream[11:22]
    b2 = next(it)
    assert it.state_dict()["epoch"] == 0 and it.state_dict()["position"] == 8
    next(it)
    assert (it.epoch, it.position, it.step) == (1, 1, 3) and _same(b2, it.batch_at(1))


def test_batches_deterministic_and_resume_equivalent():
    exs = _examples(11)
    full = SFTBatches(exs, batch_size=3, seed=5)
    ref = [next(full) for _ in range(12)]
    again = SFTBatches(exs, batch_size=3, seed=5)
    assert all(_same(a, next(again)) for a in ref)
    assert not all(_same(a, b) for a, b in zip(ref, SFTBatches(exs, batch_size=3, seed=6), strict=False))
    for k in (0, 3, 7):
        run = SFTBatches(exs, batch_size=3, seed=5)
        for _ in range(k):
            next(run)
        state = json.loads(json.dumps(run.state_dict()))  # survives a JSON checkpoint
        resumed = SFTBatches(exs, batch_size=3, seed=5)
        resumed.load_state_dict(state)
        assert resumed.step == k
        assert all(_same(ref[j], next(resumed)) for j in range(k, 12))
        assert all(_same(ref[j], resumed.batch_at(j)) for j in range(12))


def test_batches_refuse_changed_data_on_resume():
    state = SFTBatches(_examples(11), batch_size=3, seed=5).state_dict()
    with pytest.raises(LotaqafError, match="n_examples"):
        SFTBatches(_examples(10), batch_size=3, seed=5).load_state_dict(state)
    with pytest.raises(LotaqafError, match="batch_size"):
        SFTBatches(_examples(11), batch_size=4, seed=5).load_state_dict(state)
    with pytest.raises(LotaqafError):
        SFTBatches([], batch_size=2)


def test_pad_token_id():
    assert pad_token_id(None) == 0 and pad_token_id(CharTok()) == 2


# --------------------------------------------------------------------------- SmolLM2 (real chat template)


@pytest.fixture
def smollm2(smollm2_loaded):
    return smollm2_loaded


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Sky colour?"},
     {"role": "assistant", "content": "Blue"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Count to three."}, {"role": "assistant", "content": " 1, 2, 3\n"}],
]


@pytest.mark.slow
@pytest.mark.parametrize("msgs", CONVERSATIONS)
def test_smollm2_template_rendering_and_masking(smollm2, msgs):
    tok = smollm2.tokenizer
    assert tok.chat_template
    full = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
    gen_prompt = tok.apply_chat_template(msgs[:-1], tokenize=True, add_generation_prompt=True, return_dict=False)
    ex = tokenize_example(tok, msgs, source_len=4096, target_len=4096)
    assert ex["input_ids"] == full
    _check_masking(ex, len(gen_prompt))
    target = ex["input_ids"][len(gen_prompt):]
    assert tok.decode(target).startswith(msgs[-1]["content"])
    assert tok.eos_token_id in target  # <|im_end|> closes the assistant turn
    # truncation: prompt end and target start are kept
    cut = tokenize_example(tok, msgs, source_len=5, target_len=3)
    assert cut["input_ids"] == gen_prompt[-5:] + target[:3]
    _check_masking(cut, 5)


@pytest.mark.slow
def test_smollm2_plain_path_and_alpaca_record(smollm2):
    tok = smollm2.tokenizer
    rec = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    ex = tokenize_records(tok, [rec], 1024, 256)[0]
    assert ex["input_ids"] == tok.apply_chat_template(to_messages(rec), tokenize=True, return_dict=False)
    saved = tok.chat_template
    try:
        tok.chat_template = None
        prompt, target = split_prompt_target(tok, to_messages(rec))
        assert tok.decode(prompt + target).endswith("Add the numbers.\n\n2 and 3\n5" + tok.eos_token)
        assert target[-1] == tok.eos_token_id
    finally:
        tok.chat_template = saved


class EchoModel(torch.nn.Module):
    """Stands in for the 16-bit model in generate(): answers each prompt with the prompt's own
    user text (then eos), so the test can check that records pair each answer with its prompt."""

    def __init__(self, tok):
        super().__init__()
        self.tok = tok
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = type("Cfg", (), {"vocab_size": len(tok)})()

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id, **_):
        rows = []
        for ids, m in zip(input_ids, attention_mask, strict=True):
            text = self.tok.decode(ids[m.bool()].tolist())
            user = text.split("<|im_start|>user\n")[-1].split("<|im_end|>")[0]
            rows.append(self.tok(" " + user + " ", add_special_tokens=False)["input_ids"] + [eos_token_id])
        width = max(map(len, rows))
        new = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


@pytest.mark.slow
def test_smollm2_self_distill_pairs_train_prompts_with_answers(smollm2):
    from lotaqaf_cli.data.selfgen import prompt_role

    tok = smollm2.tokenizer
    recs = self_distill_records(EchoModel(tok), tok, n_samples=40, max_new_tokens=64, seed=3)
    assert len(recs) == 40
    for r in recs:
        user, answer = r["messages"]
        assert prompt_role(user["content"]) == "train"
        assert answer["content"] == user["content"]  # eos dropped, decoded text stripped
        ex = tokenize_record(tok, r, 1024, 256)
        gen_prompt = tok.apply_chat_template([user], add_generation_prompt=True, tokenize=True, return_dict=False)
        _check_masking(ex, len(gen_prompt))
        assert ex["input_ids"][-2:] == [tok.eos_token_id] + tok("\n", add_special_tokens=False)["input_ids"]
