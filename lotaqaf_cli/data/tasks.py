"""The task-specific datasets of the paper's Table 1: their layouts, prompts and answers.

    gsm8k   openai/gsm8k, config "main" (hub; train 7473 / test 1319): a grade-school word problem ->
            its worked answer ending in "#### N". Rows: ``{"question", "answer"}``; the prompt is the
            question as it is, the answer the whole worked answer.
    viggo   GEM/viggo (hub; train 5103 / validation 714 / test 1083): a sentence about a video game ->
            its meaning representation, e.g. ``inform(name[Dirt: Showdown], release_year[2012], ...)``.
            Rows: ``{"gem_id", "meaning_representation", "target", "references"}``; the input is
            ``target`` (the sentence), the answer ``meaning_representation``.
    sql     HALO's data/sql/train.jsonl and valid.jsonl (IST-DASLab/HALO; WikiSQL + Spider questions on
            CREATE TABLE contexts), which the paper used; not on the hub, so always a local file.
            Rows: ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`` whose user
            turn is "Write a SQL query to answer the question based on the table schema.\\n\\n context:
            ...\\n\\n question: ..." and whose assistant turn is the query.

All go through the chat template as the paper trains: an empty system turn, then the user prompt;
the answer is the assistant turn (its prompt tokens masked in training). Evaluation renders the same
turns with the generation prompt (docs/decisions.md: why the system turn is kept at evaluation).
The prompts are the protocol's (HALO's preprocessing, reused by the LoTA-QAF authors' evaluation).
Nothing here prints; only :func:`read_rows` and :func:`hub_rows` touch files or the network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import LotaqafError

VIGGO_FUNCTIONS = ("inform", "request", "give_opinion", "confirm", "verify_attribute", "suggest",
                   "request_explanation", "recommend", "request_attribute")
VIGGO_ATTRIBUTES = ("name", "exp_release_date", "release_year", "developer", "esrb", "rating", "genres",
                    "player_perspective", "has_multiplayer", "platforms", "available_on_steam", "has_linux_release",
                    "has_mac_release", "specifier")
VIGGO_PROMPT = (
    "Given a target sentence construct the underlying meaning representation of the input sentence as a single "
    "function with attributes and attribute values. This function should describe the target string accurately "
    f"and the function must be one of the following {list(VIGGO_FUNCTIONS)}. The attributes must be one of the "
    f"following: {list(VIGGO_ATTRIBUTES)}\n\n### Target sentence:\n{{target}}")


@dataclass(frozen=True)
class TaskData:
    """One task's data: where it lives and how a row becomes (prompt, answer)."""

    name: str
    title: str
    hub: str | None            # hub dataset id; None: a local file only
    hub_config: str | None
    train_split: str
    eval_split: str
    fields: tuple[str, ...]    # what a row of the layout must have
    layout: str                # the layout, in words, for error messages

    def prompt(self, row: dict) -> str:
        return {"gsm8k": lambda: row["question"], "viggo": lambda: VIGGO_PROMPT.format(target=row["target"]),
                "sql": lambda: row["messages"][0]["content"]}[self.name]()

    def answer(self, row: dict) -> str:
        return {"gsm8k": lambda: row["answer"], "viggo": lambda: row["meaning_representation"],
                "sql": lambda: row["messages"][1]["content"]}[self.name]()


TASKS = {
    "gsm8k": TaskData("gsm8k", "GSM8K", "openai/gsm8k", "main", "train", "test", ("question", "answer"),
                      "openai/gsm8k's (question, answer)"),
    "viggo": TaskData("viggo", "ViGGO", "GEM/viggo", None, "train", "test", ("meaning_representation", "target"),
                      "GEM/viggo's (gem_id, meaning_representation, target, references)"),
    "sql": TaskData("sql", "SQL", None, None, "train", "valid", ("messages",),
                    "HALO's data/sql JSONL ({\"messages\": [user question with its CREATE TABLE context, "
                    "assistant query]})"),
}


def task(name: str) -> TaskData:
    if name not in TASKS:
        raise LotaqafError(f"unknown task '{name}' (choose from {', '.join(TASKS)})")
    return TASKS[name]


def check_row(t: TaskData, row) -> None:
    """Raise a one-line LotaqafError unless ``row`` is in the task's layout."""
    if not isinstance(row, dict):
        raise LotaqafError(f"a {t.title} row must be a JSON object in {t.layout} layout, got {type(row).__name__}")
    missing = [f for f in t.fields if f not in row]
    if missing:
        raise LotaqafError(f"not a {t.title} row: no {', '.join(repr(f) for f in missing)} "
                           f"(has: {', '.join(sorted(map(str, row))) or 'none'}; expected {t.layout})")
    if t.name != "sql":
        for f in t.fields:
            if not isinstance(row[f], str) or not row[f].strip():
                raise LotaqafError(f"not a {t.title} row: '{f}' must be a non-empty string")
        return
    msgs = row["messages"]
    roles = [m.get("role") if isinstance(m, dict) else None for m in msgs] if isinstance(msgs, list) else None
    if roles != ["user", "assistant"] or not all(isinstance(m.get("content"), str) and m["content"].strip()
                                                 for m in msgs):
        raise LotaqafError(f"not a {t.title} row: 'messages' must be a user turn then an assistant turn, each "
                           f"with non-empty string content (got roles {roles})")


def read_rows(t: TaskData, path: str | Path) -> list[dict]:
    """The rows of a local JSONL file in the task's layout (one-line errors naming the line)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise LotaqafError(f"{t.title} data file not found: {path}")
    rows = []
    with open(p, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LotaqafError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.pos + 1})") from None
            try:
                check_row(t, row)
            except LotaqafError as e:
                raise LotaqafError(f"{path}:{n}: {e}") from None
            rows.append(row)
    if not rows:
        raise LotaqafError(f"{t.title} data file {path} holds no rows")
    return rows


def hub_rows(t: TaskData, split: str) -> list[dict]:
    """The rows of a hub split (one-line errors when the hub is unreachable)."""
    from ..hub import hub_reachable
    from .hub_dataset import load_split

    if t.hub is None:
        raise LotaqafError(f"{t.title} data is not on the hub: give the local file ({t.layout})")
    if not hub_reachable():
        raise LotaqafError(f"{t.title} needs the Hugging Face hub ({t.hub}), which is unreachable; offline, give a "
                           f"local copy in {t.layout} layout (data.path=FILE to train, eval.{t.name}_file=FILE to "
                           "evaluate)")
    rows = list(load_split(t.hub, t.hub_config, split))
    for row in rows[:1]:
        check_row(t, row)
    return rows


def rows(t: TaskData, path: str | None, split: str) -> list[dict]:
    """A local file's rows, or the hub split's when ``path`` is None or the task's hub id."""
    return hub_rows(t, split) if path in (None, t.hub) else read_rows(t, path)


def prompt_messages(t: TaskData, row: dict) -> list[dict]:
    """The turns before the answer: an empty system turn and the user prompt."""
    return [{"role": "system", "content": ""}, {"role": "user", "content": t.prompt(row)}]


def record(t: TaskData, row: dict) -> dict:
    """A training record (``{"messages": [...]}``) of one row: the prompt turns and the answer."""
    return {"messages": [*prompt_messages(t, row), {"role": "assistant", "content": t.answer(row)}]}
