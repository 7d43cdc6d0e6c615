"""The task-specific tasks (GSM8K, SQL, ViGGO): layouts, prompts, the exact-match rules, greedy
generation against an independent token-by-token decode, training records, the shipped synthetic task,
and the lm-eval passthrough against log-likelihoods computed here."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from cli_helpers import load_script, run_commands_in

from lotaqaf_cli.config import compose
from lotaqaf_cli.data import sft, tasks
from lotaqaf_cli.data.shipped import DIR as SHIPPED
from lotaqaf_cli.errors import LotaqafError
from lotaqaf_cli.eval import generation, lm_eval_tasks

# Hand-written rows in the upstream layouts (not the datasets' data): openai/gsm8k's and GEM/viggo's fields,
# and HALO's data/sql JSONL (a user turn with the CREATE TABLE context and the question, the query as the answer).
GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 2 more. How many apples does he have now?",
     "answer": "He has 3 + 2 = <<3+2=5>>5 apples.\n#### 5"},
    {"question": "A box holds 12 pencils. How many pencils are in 3 boxes?",
     "answer": "3 boxes hold 3 * 12 = <<3*12=36>>36 pencils.\n#### 36"},
]
VIGGO_ROWS = [
    {"gem_id": "viggo-test-0", "meaning_representation": "inform(name[Moon Garden], release_year[2011], genres[puzzle, indie])",
     "target": "Moon Garden is an indie puzzle game from 2011.", "references": ["Moon Garden is an indie puzzle game from 2011."]},
    {"gem_id": "viggo-test-1", "meaning_representation": "request_attribute(platforms[])",
     "target": "Which platform do you play on?", "references": ["Which platform do you play on?"]},
]
SQL_USER = ("Write a SQL query to answer the question based on the table schema.\n\n context: CREATE TABLE {t} "
            "({c} VARCHAR, city VARCHAR)\n\n question: {q}")
SQL_ROWS = [
    {"messages": [{"role": "user", "content": SQL_USER.format(t="table_1", c="name", q="Who lives in Oslo?")},
                  {"role": "assistant", "content": "SELECT name FROM table_1 WHERE city = 'Oslo'"}]},
    {"messages": [{"role": "user", "content": SQL_USER.format(t="table_2", c="team", q="Which team is from Lima?")},
                  {"role": "assistant", "content": "SELECT team FROM table_2 WHERE city = 'Lima'"}]},
]


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- the exact-match rules

@pytest.mark.parametrize("pred,ok", [
    ("inform(name[A], release_year[2011], genres[puzzle, indie])", True),
    ("  inform(release_year[2011], name[A], genres[puzzle, indie]) ", True),   # attribute order is free
    ("inform(name[A], genres[puzzle, indie], release_year[2011])", True),
    ("inform(name[A], release_year[2012], genres[puzzle, indie])", False),     # a value
    ("inform(name[A], release_year[2011], genres[indie, puzzle])", False),     # the pieces carry [ and ]
    ("confirm(name[A], release_year[2011], genres[puzzle, indie])", False),    # the function
    ("inform(name[A], release_year[2011])", False),                            # an attribute fewer
    ("inform(name[a], release_year[2011], genres[puzzle, indie])", False),     # case
    ("inform(name[A],release_year[2011],genres[puzzle,indie])", True),         # pieces are stripped
])
def test_viggo_match(pred, ok):
    assert generation.viggo_match(pred, "inform(name[A], release_year[2011], genres[puzzle, indie])") is ok


def test_gsm8k_match():
    label = GSM8K_ROWS[0]["answer"]
    assert generation.gsm8k_match("3 + 2 = 5.\n#### 5 ", label)
    assert generation.gsm8k_match("#### 2\nno, #### 5", label)          # the last "####"
    assert not generation.gsm8k_match("#### 5.0", label)                # a string, not a number
    assert not generation.gsm8k_match("The answer is 5", label)         # no "####": the whole text


def test_sql_match():
    assert generation.sql_match(" SELECT a FROM t\n", "SELECT a FROM t")
    assert not generation.sql_match("select a FROM t", "SELECT a FROM t")
    assert not generation.sql_match("SELECT a  FROM t", "SELECT a FROM t")


# --------------------------------------------------------------------------- layouts and records

def test_rows_in_the_wrong_layout_are_one_line(tmp_path):
    v, s = tasks.task("viggo"), tasks.task("sql")
    with pytest.raises(LotaqafError, match=r"x.jsonl:2: not a ViGGO row: no 'meaning_representation'"):
        tasks.read_rows(v, _write(tmp_path / "x.jsonl", [VIGGO_ROWS[0], {"target": "t"}]))
    with pytest.raises(LotaqafError, match=r"x.jsonl:1: not a SQL row: 'messages' must be a user turn then an "
                                           r"assistant turn.*\['user'\]"):
        tasks.read_rows(s, _write(tmp_path / "x.jsonl", [{"messages": SQL_ROWS[0]["messages"][:1]}]))
    with pytest.raises(LotaqafError, match=r"not a SQL row: no 'messages'"):
        tasks.read_rows(s, _write(tmp_path / "x.jsonl", VIGGO_ROWS))
    with pytest.raises(LotaqafError, match=r"x.jsonl:1: not a GSM8K row: no 'answer'"):
        tasks.read_rows(tasks.task("gsm8k"), _write(tmp_path / "x.jsonl", [{"question": "q"}]))
    (tmp_path / "bad.jsonl").write_text('{"target": \n')
    with pytest.raises(LotaqafError, match=r"bad.jsonl:1: invalid JSON"):
        tasks.read_rows(v, tmp_path / "bad.jsonl")
    with pytest.raises(LotaqafError, match="not found"):
        tasks.read_rows(v, tmp_path / "none.jsonl")


def test_training_records(tmp_path):
    recs = sft.load_records("viggo", str(_write(tmp_path / "v.jsonl", VIGGO_ROWS)))
    assert recs[0]["messages"] == [
        {"role": "system", "content": ""},
        {"role": "user", "content": tasks.VIGGO_PROMPT.replace("{target}", VIGGO_ROWS[0]["target"])},
        {"role": "assistant", "content": VIGGO_ROWS[0]["meaning_representation"]}]
    assert recs[0]["messages"][1]["content"].endswith("'specifier']\n\n### Target sentence:\n" + VIGGO_ROWS[0]["target"])
    recs = sft.load_records("sql", str(_write(tmp_path / "s.jsonl", SQL_ROWS)))
    assert [m["content"] for m in recs[1]["messages"]] == ["", *[m["content"] for m in SQL_ROWS[1]["messages"]]]


def test_shipped_synthetic_task_is_what_its_script_writes(tmp_path):
    load_script("make_viggo_synth").write(tmp_path)
    for split, n in (("train", 1024), ("test", 100)):
        shipped = (SHIPPED / f"viggo_synth-{split}.jsonl").read_bytes()
        assert (tmp_path / f"viggo_synth-{split}.jsonl").read_bytes() == shipped
        rows = tasks.read_rows(tasks.task("viggo"), SHIPPED / f"viggo_synth-{split}.jsonl")
        assert len(rows) == n and all(r["meaning_representation"].split("(")[0] in tasks.VIGGO_FUNCTIONS for r in rows)
    names = [{r["meaning_representation"].split("name[")[1].split("]")[0]
              for r in tasks.read_rows(tasks.task("viggo"), SHIPPED / f"viggo_synth-{s}.jsonl")
              if "name[" in r["meaning_representation"]} for s in ("train", "test")]
    assert names[1] and not names[0] & names[1]  # the test games are unseen in training
    cfg = compose(["recipe=smollm2_viggo_synth"])
    assert cfg.data.path == str(SHIPPED / "viggo_synth-train.jsonl") and cfg.eval.viggo_file.endswith("test.jsonl")


# --------------------------------------------------------------------------- generation

def _reference_greedy(model, tok, ids: list[int], max_length: int) -> str:
    """Token by token: the argmax of a full forward over everything so far (no cache, no padding)."""
    ids = list(ids)
    new = []
    with torch.no_grad():
        while len(ids) < max_length:
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            new.append(nxt)
            if nxt == tok.eos_token_id:
                break
    return tok.decode(new, skip_special_tokens=True).strip()


@pytest.mark.slow
@pytest.mark.parametrize("name,rows", [("gsm8k", GSM8K_ROWS), ("viggo", VIGGO_ROWS), ("sql", SQL_ROWS)])
def test_exact_match_of_independent_greedy(tmp_path, smollm2_loaded, name, rows):
    model, tok = smollm2_loaded.model.eval(), smollm2_loaded.tokenizer
    t = tasks.task(name)
    prompts = []
    for r in rows:  # the prompt as training renders it: the chat template, empty system turn
        text = tok.apply_chat_template(tasks.prompt_messages(t, r), tokenize=False, add_generation_prompt=True)
        prompts.append(tok(text, add_special_tokens=False)["input_ids"])
        assert prompts[-1] == sft.split_prompt_target(tok, tasks.record(t, r)["messages"])[0]
    max_length = max(map(len, prompts)) + 12
    expected = [_reference_greedy(model, tok, p, max_length) for p in prompts]
    # the first row's answer is set to what the model writes, so that one item matches and one does not
    rows = [json.loads(json.dumps(r)) for r in rows]
    if name == "sql":
        rows[0]["messages"][1]["content"] = expected[0]
    else:
        rows[0]["answer" if name == "gsm8k" else "meaning_representation"] = expected[0]
    path = _write(tmp_path / f"{name}.jsonl", rows)
    res = generation.evaluate_task(model, tok, name, generation.eval_rows(name, path), batch_size=2,
                                   max_length=max_length)
    assert [s["generated"] for s in res["samples"]] == expected
    assert [s["exact_match"] for s in res["samples"]] == [1.0, float(expected[1] == t.answer(rows[1]))]
    assert res["exact_match"] == pytest.approx(sum(s["exact_match"] for s in res["samples"]) / 2) and res["n"] == 2


# --------------------------------------------------------------------------- lm-eval passthrough

TINY_TASK = """task: lotaqaf_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
target_delimiter: ""
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
TINY_DOCS = [{"question": "The capital of France is", "choices": [" Paris", " a banana"], "answer": 0},
             {"question": "Two plus two equals", "choices": [" seven", " four"], "answer": 1},
             {"question": "The sky on a clear day is", "choices": [" green", " blue", " loud"], "answer": 1}]


def test_unknown_task_names_close_ones():
    with pytest.raises(LotaqafError, match=r"unknown eval task 'viggoo'.*close: viggo"):
        lm_eval_tasks.check(["mmlu", "viggoo"])
    lm_eval_tasks.check(["mmlu", "arc_easy"])  # an lm-eval task passes


@pytest.mark.slow
def test_lm_eval_task_passes_through(tmp_path, smollm2_loaded):
    """A task lm-eval runs from an include folder (local data): its accuracy equals the argmax of the
    choices' log-likelihoods computed here."""
    model, tok = smollm2_loaded.model.eval(), smollm2_loaded.tokenizer
    data = _write(tmp_path / "docs.jsonl", TINY_DOCS)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(TINY_TASK.format(data=data))
    include = str(tmp_path / "tasks")
    lm_eval_tasks.check(["lotaqaf_tiny_mc"], include)
    res = lm_eval_tasks.evaluate(model, tok, ["lotaqaf_tiny_mc"], batch_size=1, include_path=include)
    correct = []
    with torch.no_grad():
        for d in TINY_DOCS:
            ctx = tok(d["question"], add_special_tokens=False)["input_ids"]
            lls = []
            for c in d["choices"]:
                cont = tok(d["question"] + c, add_special_tokens=False)["input_ids"][len(ctx):]
                logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].double(), -1)
                lls.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
            correct.append(max(range(len(lls)), key=lls.__getitem__) == d["answer"])
    assert math.isclose(res["results"]["lotaqaf_tiny_mc"]["acc,none"], sum(correct) / len(correct))


# --------------------------------------------------------------------------- the command line, offline

@pytest.mark.slow
def test_train_on_a_task_file_then_eval_sql_and_viggo(tmp_path, monkeypatch, smollm2_loaded):
    """`lotaqaf train` on SQL rows (a local file), then `lotaqaf eval --tasks sql,viggo` on local files:
    offline, the embedded model (the session's copy instead of a second 15 s load; RTN for speed), the
    run's adapter model; eval.max_length is short (the ViGGO prompt alone is longer, so its answer is
    empty) to keep the test quick."""
    monkeypatch.setattr("lotaqaf_cli.session.load_model", lambda *a, **k: copy.deepcopy(smollm2_loaded))
    sql, viggo = _write(tmp_path / "sql.jsonl", SQL_ROWS), _write(tmp_path / "viggo.jsonl", VIGGO_ROWS)
    run_commands_in(tmp_path, [
        ["train", "recipe=smollm2_viggo_synth", "data=sql", f"data.path={sql}", "quant.method=rtn", "calib.n_samples=2",
         "calib.seq_len=32", "optim.steps=1", "optim.batch_size=2", "stages=[quantize,train]", "run.dir=runs/t"],
        ["eval", "run=runs/t", "--model", "adapter", "--tasks", "sql,viggo", "--sql-file", str(sql), "--viggo-file",
         str(viggo), "--limit", "1", "eval.max_length=96"]])
    out = json.loads((tmp_path / "runs/t/eval-adapter.json").read_text())
    assert out["sql"]["n"] == 1 and out["viggo"]["n"] == 1 and out["model"] == "adapter"
    assert out["sql"]["samples"][0]["target"] == SQL_ROWS[0]["messages"][1]["content"]
    assert out["sql"]["samples"][0]["generated"] and out["viggo"]["samples"][0]["generated"] == ""
