"""MMLU: the offline data and task builder, the prompt format, the fast scorer against lm-eval."""

import io
import json
import re
from pathlib import Path

import pytest
import torch

from lotaqaf_cli.data import mmlu
from lotaqaf_cli.errors import LotaqafError

SHORT = "abstract_algebra"                      # 5-shot prompts fit 2048 tokens of the test tokenizer
LONG = "high_school_european_history"           # they do not: lm-eval cuts them from the left


@pytest.fixture(scope="module")
def questions():
    return mmlu.load_questions()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return mmlu.build_offline_tasks(tmp_path_factory.mktemp("mmlu_tasks"))


def _tokenizer(questions, split_space: bool):
    """A 256-token BPE tokenizer (the smoke model's vocabulary) trained on a slice of MMLU, with BOS.

    GPT-2-like pre-tokenization keeps " A" one token; ``split_space`` makes the space its own
    token, so every answer continuation is two tokens (the multi-token path of the scorer)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    sp = "" if split_space else " ?"
    pattern = rf"{sp}[A-Za-z]+|{sp}[0-9]|{sp}[^\sA-Za-z0-9]+|\s+"
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  limit_alphabet=120, show_progress=False)
    tok.train_from_iterator([mmlu.format_example(q) for q in questions[::25]], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


@pytest.fixture(scope="module")
def tok(questions):
    return _tokenizer(questions, split_space=False)


@pytest.fixture(scope="module")
def tok_split(questions):
    return _tokenizer(questions, split_space=True)


@pytest.fixture(scope="module")
def sharp():
    """The smoke model with larger random weights (its default init predicts the same letter for
    every question) and a 2048-token context, so most 5-shot prompts fit."""
    from lotaqaf_cli.io.models import smoke_model

    m = smoke_model(seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2, generator=g)
    m.config.max_position_embeddings = 2048
    return m


# --------------------------------------------------------------------------- data and tasks


def test_offline_rows_and_split(questions):
    assert len(questions) == mmlu.N_QUESTIONS == 14042
    splits = mmlu.split_fewshot(questions)
    assert len(splits) == 57 and set(splits) == set(mmlu.SUBJECT_CATEGORY)
    assert all(len(sp.fewshot) == 5 for sp in splits.values())
    assert sum(len(sp.fewshot) + len(sp.test) for sp in splits.values()) == 14042
    assert all(q.question != "question" for q in questions)       # the 2 header rows are gone
    # the few-shot rows are the first 5 of the subject in file order
    aa = [q for q in questions if q.subject == SHORT]
    assert splits[SHORT].fewshot == tuple(aa[:5]) and splits[SHORT].test == tuple(aa[5:])


def test_categories_cover_all_subjects_and_match_lm_eval():
    counts = {c: sum(1 for v in mmlu.SUBJECT_CATEGORY.values() if v == c) for c in mmlu.CATEGORIES}
    assert counts == {"stem": 19, "humanities": 13, "social_sciences": 12, "other": 13}
    assert len(mmlu.SUBJECT_CATEGORY) == 57
    import lm_eval

    # lm-eval's own per-subject files carry the category in their tag (checked, not copied)
    d = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    theirs = {}
    for f in d.glob("mmlu_*.yaml"):
        text = f.read_text()
        subject = re.search(r'"dataset_name": "(\w+)"', text).group(1)
        theirs[subject] = re.search(r'"tag": "mmlu_(\w+)_tasks"', text).group(1)
    assert theirs == mmlu.SUBJECT_CATEGORY


def test_build_offline_tasks(built):
    include_path, names, group = built
    assert len(names) == 57 and group == mmlu.GROUP_NAME
    data = Path(include_path) / "data"
    n_test = n_dev = 0
    for s in mmlu.SUBJECTS:
        dev = [json.loads(x) for x in (data / f"{s}.dev.jsonl").read_text().splitlines()]
        test = (data / f"{s}.test.jsonl").read_text().splitlines()
        assert len(dev) == 5 and set(dev[0]) == {"question", "subject", "choices", "answer"}
        n_dev, n_test = n_dev + len(dev), n_test + len(test)
    assert n_dev == 285 and n_dev + n_test == 14042
    groups = {}
    for cat in mmlu.CATEGORIES:
        cfg = json.loads((Path(include_path) / f"_{mmlu.category_group(cat)}.yaml").read_text())
        groups.update({t: cat for t in cfg["task"]})
    assert groups == {mmlu.task_name(s): c for s, c in mmlu.SUBJECT_CATEGORY.items()}

    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=include_path, include_defaults=False)
    assert set(names) <= set(tm.all_subtasks)
    assert {group, *(mmlu.category_group(c) for c in mmlu.CATEGORIES)} <= set(tm.all_groups)


def test_prompts_match_lm_eval(built, questions):
    """Our context strings are exactly what lm-eval builds from the generated tasks."""
    from lm_eval.tasks import TaskManager, get_task_dict

    tm = TaskManager(include_path=built[0], include_defaults=False)
    td = get_task_dict([mmlu.task_name(SHORT), mmlu.task_name("moral_scenarios")], tm)
    splits = mmlu.split_fewshot(questions)
    for name, task in td.items():
        subject = name[len(mmlu.TASK_PREFIX):]
        task.set_config(key="num_fewshot", value=5)
        task.build_all_requests(limit=3, rank=0, world_size=1)
        assert len(task.instances) == 12
        for inst in task.instances:
            ctx, cont = inst.args
            sp = splits[subject]
            assert ctx == mmlu.fewshot_prefix(subject, sp.fewshot, 5) + mmlu.format_question(sp.test[inst.doc_id])
            assert cont in mmlu.continuations()
    assert mmlu.format_question(splits[SHORT].test[0]).endswith("\nD. " + splits[SHORT].test[0].choices[3] + "\nAnswer:")


# --------------------------------------------------------------------------- fast scorer


def _lm_eval_loglikelihoods(model, tokenizer, contexts, conts, max_length=None):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=max_length)
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=(c, k), idx=i)
            for c in contexts for i, k in enumerate(conts)]
    lls = [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
    return torch.tensor(lls, dtype=torch.float64).view(len(contexts), len(conts))


@pytest.mark.parametrize("which", ["tok", "tok_split"])
def test_fast_scores_equal_lm_eval_loglikelihood(which, request, sharp, questions):
    from lotaqaf_cli.eval.mcq import encode_pair, score_subject

    tokenizer = request.getfixturevalue(which)
    sp = mmlu.split_fewshot(questions)[SHORT]
    prefix = mmlu.fewshot_prefix(SHORT, sp.fewshot, 5)
    texts = [mmlu.format_question(q) for q in sp.test[:6]]
    n_cont = len(encode_pair(tokenizer, prefix + texts[0], " A")[1])
    assert n_cont == (2 if which == "tok_split" else 1)
    ref = _lm_eval_loglikelihoods(sharp, tokenizer, [prefix + t for t in texts], mmlu.continuations())
    res = score_subject(sharp, tokenizer, prefix, texts, batch_size=4)
    assert res.prefix_tokens > 100 and res.truncated == 0
    assert torch.allclose(res.logprobs, ref, atol=1e-4, rtol=0)
    assert res.predictions == ref.argmax(1).tolist()
    assert len(set(res.predictions)) > 1                 # the sample discriminates
    # without the cache: the same numbers
    full = score_subject(sharp, tokenizer, prefix, texts, batch_size=2, use_cache=False)
    assert full.prefix_tokens == 0 and torch.allclose(full.logprobs, res.logprobs, atol=1e-4, rtol=0)
    if which == "tok":
        assert res.stats["rows"] == len(texts)             # one forward row per question


def test_fast_truncates_like_lm_eval(sharp, tok, questions):
    from lotaqaf_cli.eval.mcq import score_subject

    sp = mmlu.split_fewshot(questions)[SHORT]
    prefix = mmlu.fewshot_prefix(SHORT, sp.fewshot, 5)
    texts = [mmlu.format_question(q) for q in sp.test[:3]]
    ref = _lm_eval_loglikelihoods(sharp, tok, [prefix + t for t in texts], mmlu.continuations(), max_length=300)
    res = score_subject(sharp, tok, prefix, texts, max_length=300)
    assert res.truncated == 3 and res.prefix_tokens == 0
    assert torch.allclose(res.logprobs, ref, atol=1e-4, rtol=0)


def test_engines_agree_on_smoke_model(sharp, tok, tmp_path):
    from lotaqaf_cli.eval.mmlu import evaluate_mmlu, results_markdown, results_table

    kw = dict(subjects=[SHORT, LONG], limit=6, batch_size=3, return_predictions=True, progress=False,
              tasks_dir=tmp_path / "tasks")
    slow = evaluate_mmlu(sharp, tok, engine="lm-eval", **kw)
    fast = evaluate_mmlu(sharp, tok, engine="fast", **kw)
    assert fast["predictions"] == slow["predictions"]
    assert fast["subjects"] == slow["subjects"] and fast["average"] == slow["average"]
    assert fast["task_config_hash"] == slow["task_config_hash"]
    assert slow["average"]["n"] == 12 and slow["data_note"] == mmlu.OFFLINE_NOTE
    assert set(slow["categories"]) == {"stem", "humanities"}
    s = slow["subjects"]
    assert slow["categories"]["stem"]["acc"] == s[SHORT]["acc"]
    assert slow["average"]["acc"] == (s[SHORT]["correct"] + s[LONG]["correct"]) / 12
    md = results_markdown(slow)
    assert mmlu.OFFLINE_NOTE in md and "| Humanities | STEM | Social | Other | Avg |" in md
    assert slow["lm_eval_version"] in md and f"first {6} questions per subject" in md
    json.dumps(slow)
    from rich.console import Console

    con = Console(record=True, width=200, file=io.StringIO())
    con.print(results_table(slow, per_subject=True))
    text = con.export_text()
    assert "STEM" in text and LONG in text and "Avg" in text


def test_bad_arguments(sharp, tok, monkeypatch):
    from lotaqaf_cli.eval.mmlu import evaluate_mmlu

    for bad in (0, -3):
        with pytest.raises(LotaqafError, match="limit"):
            evaluate_mmlu(sharp, tok, limit=bad)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LotaqafError, match="hub"):
        evaluate_mmlu(sharp, tok, source="hub", limit=1)
    with pytest.raises(LotaqafError, match="tokenizer"):
        evaluate_mmlu(sharp, None, limit=1)
    with pytest.raises(LotaqafError, match="engine"):
        evaluate_mmlu(sharp, tok, engine="vllm")
    with pytest.raises(LotaqafError, match="subject"):
        evaluate_mmlu(sharp, tok, subjects=["astrology"])
    with pytest.raises(LotaqafError, match="num_fewshot"):
        evaluate_mmlu(sharp, tok, num_fewshot=6)



def test_check_mmlu_args_names_config_keys():
    from lotaqaf_cli.eval.mmlu import check_mmlu_args

    check_mmlu_args("fast", None, 0, 1)
    check_mmlu_args("lm-eval", 3, mmlu.FEWSHOT_ROWS, 8)
    for args, key in ((("vllm", None, 5, 4), "eval.engine"), (("fast", 0, 5, 4), "eval.limit"),
                      (("fast", True, 5, 4), "eval.limit"), (("fast", 2.5, 5, 4), "eval.limit"),
                      (("fast", None, 6, 4), "eval.num_fewshot"), (("fast", None, -1, 4), "eval.num_fewshot"),
                      (("fast", None, 5, 0), "eval.batch_size")):
        with pytest.raises(LotaqafError, match=re.escape(key)):
            check_mmlu_args(*args)

@pytest.mark.slow
def test_engines_agree_on_smollm2(smollm2_loaded):
    from lotaqaf_cli.eval.mcq import score_subject
    from lotaqaf_cli.eval.mmlu import evaluate_mmlu

    m, t = smollm2_loaded.model, smollm2_loaded.tokenizer
    kw = dict(subjects=["college_physics", "marketing"], limit=3, batch_size=3, return_predictions=True,
              progress=False)
    slow = evaluate_mmlu(m, t, engine="lm-eval", **kw)
    fast = evaluate_mmlu(m, t, engine="fast", **kw)
    assert fast["predictions"] == slow["predictions"]
    assert fast["average"] == slow["average"]
    # SmolLM2 encodes " A" as one token: one forward row per question after the cached prefix
    sp = mmlu.offline_splits()["marketing"]
    res = score_subject(m, t, mmlu.fewshot_prefix("marketing", sp.fewshot, 5),
                        [mmlu.format_question(q) for q in sp.test[:2]])
    assert res.stats["rows"] == 2 and res.prefix_tokens > 300


def test_auto_source_falls_back_offline(monkeypatch):
    from lotaqaf_cli.eval import mmlu as mmlu_eval

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source, notes = mmlu_eval._resolve_source("auto")
    assert source == "offline" and len(notes) == 1 and "unreachable" in notes[0]
    h = mmlu_eval.task_config_hash("offline", 5, [SHORT])
    assert h == mmlu_eval.task_config_hash("offline", 5, [SHORT]) != mmlu_eval.task_config_hash("offline", 0, [SHORT])
