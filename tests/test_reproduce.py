"""scripts/reproduce.py --quick: the reproduction runs end to end on SmolLM2 (INT2, small subset), at
both precisions, and --check holds the fp32 run to the committed docs/results/smollm2_quick.json.

Asserts what the issue asks of every submission: the merged LoTA-QAF model scores exactly what its
adapter model scored (every MMLU prediction and the perplexity), and LoTA-QAF lowers held-out
perplexity relative to plain GPTQ at INT2.
"""

import copy
import json
from pathlib import Path

import pytest
from cli_helpers import load_script

QUICK_REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "results" / "smollm2_quick.json"


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    """One runs root for both precisions: the second run reuses the first's cached GPTQ base, as a user's
    second run does (the base is quantized in float32 whatever the precision, and cached by content)."""
    return tmp_path_factory.mktemp("reproduce") / "runs"


# fp32: every quick row, held to the committed reference; bf16: the two exact kinds that merge through it
# differently (ternary markers + offset factor, trained fp16 scales), to keep make test's time
QUICK_ROWS = {"fp32": ("lora", "qalora", "lota", "lota_int", "scales", "zeros"), "bf16": ("lota", "scales")}


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_reproduce_quick(tmp_path, smollm2_loaded, runs_root, precision):
    rep = load_script("reproduce")
    out = tmp_path / "results" / "smollm2_quick"
    methods = [] if precision == "fp32" else ["--methods", *QUICK_ROWS[precision]]
    args = rep.parse_args(["--quick", "--steps", "3", "--root", str(runs_root), "--out", str(out),
                           "--precision", precision, *methods])
    res = rep.reproduce(args, source=smollm2_loaded)
    paths = rep.write_outputs(res, args.out)

    assert [c["method"] for c in res["merge_checks"]] == [m for m in QUICK_ROWS[precision] if m in rep.EXACT]
    for check in res["merge_checks"]:
        assert check["questions"] == 2 * 5
        assert check["same_predictions"] == check["questions"]
        assert check["merged_ppl"] == check["adapter_ppl"]
        assert check["merged_avg"] == check["adapter_avg"]
        assert check["certificate_max_abs_logit_diff"] == 0.0

    by = {(r["method"], r["bits"]): r for r in res["rows"]}
    assert set(by) == {("base", 16), ("gptq", 2), *((m, 2) for m in QUICK_ROWS[precision])}
    assert by[("lota", 2)]["ppl"] < by[("gptq", 2)]["ppl"]
    assert by[("lota", 2)]["checkpoint_format"] == "lotaqaf_float_zero"   # the offset factor: float zero points
    assert by[("scales", 2)]["checkpoint_format"] == "gptq"   # trained scales merge into a plain GPTQ checkpoint
    assert by[("gptq", 2)]["recovery"] == 0.0 and by[("lota", 2)]["recovery"] > 0
    assert by[("base", 16)]["ppl"] < by[("gptq", 2)]["ppl"]
    if precision == "fp32":
        assert by[("lota_int", 2)]["checkpoint_format"] == "gptq"   # no offset factor: plain GPTQ
        assert by[("zeros", 2)]["checkpoint_format"] == "lotaqaf_float_zero"
        assert by[("scales", 2)]["params"] == by[("zeros", 2)]["params"] > 0   # one value per (group, column)
        assert by[("lota", 2)]["bpw"] > by[("lota_int", 2)]["bpw"] == by[("gptq", 2)]["bpw"] == 2 + (16 + 2) / 32
    # 3 steps move few codes: at fp32 some cross omega; at bf16 the one crossing lands on a code at the
    # grid's edge and the boundary check blocks it (checked by hand on 2026-12-05)
    assert (0 < by[("lota", 2)]["codes_changed"] < 1) if precision == "fp32" else by[("lota", 2)]["codes_changed"] < 1
    assert res["settings"]["precision"] == precision
    assert all(r["n_questions"] == 10 for r in res["rows"])

    md = Path(paths[".md"]).read_text()
    assert "| 2 | LoTA-QAF |" in md and "| 2 | scales (PEQA) |" in md
    assert f"python scripts/reproduce.py --quick{' --methods lota scales' * (precision == 'bf16')} --steps 3 " \
           f"--precision {precision}" in md
    assert json.loads(Path(paths[".json"]).read_text())["rows"][0]["method"] == "base"
    assert Path(paths[".png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if precision == "fp32":  # the gate: `reproduce.py --quick --check` on what make test just ran
        ref = json.loads(QUICK_REFERENCE.read_text())
        assert ref["command"] == "python scripts/reproduce.py --quick --steps 3 --precision fp32"
        assert rep.check(res, ref) == []


def _check(rep, tmp_path, results: dict, reference: dict, *flags):
    """`reproduce.py --check REF --results RES` on two JSON files; its exit code."""
    (tmp_path / "res.json").write_text(json.dumps(results))
    (tmp_path / "ref.json").write_text(json.dumps(reference))
    return rep.main(["--check", str(tmp_path / "ref.json"), "--results", str(tmp_path / "res.json"), *flags])


def test_check_names_the_row_that_moved(tmp_path, capsys):
    rep = load_script("reproduce")
    committed = json.loads(QUICK_REFERENCE.read_text())
    assert _check(rep, tmp_path, committed, committed) == 0

    tampered = copy.deepcopy(committed)  # the committed LoTA-QAF perplexity edited by 5%
    row = next(r for r in tampered["rows"] if r["method"] == "lota")
    row["ppl"] *= 1.05
    assert _check(rep, tmp_path, committed, tampered) == 1
    err = capsys.readouterr().err
    assert "moved: INT2 LoTA-QAF: held-out perplexity" in err and "-4.8%" in err
    assert err.count("moved:") == 1
    assert rep.check(committed, tampered, ppl_tol=0.06) == []  # within a wider tolerance

    # an MMLU average 3 standard errors off; a certificate that is not 0; a row missing
    moved = copy.deepcopy(committed)
    gptq = next(r for r in moved["rows"] if r["method"] == "gptq")
    n, p = gptq["n_questions"], gptq["avg"]
    q = min(max(p, 0.5 / n), 1 - 0.5 / n)
    gptq["avg"] = p + 3 * (q * (1 - q) / n) ** 0.5
    moved["merge_checks"][0].update(certificate_max_abs_logit_diff=1e-7, ok=False)
    moved["rows"] = [r for r in moved["rows"] if r["method"] != "qalora"]
    lines = rep.check(moved, committed)
    assert [ln.split(":")[0] for ln in lines] == ["INT2 GPTQ", "INT2 QA-LoRA", "INT2 LoTA-QAF merge"]
    assert "+3.0 standard errors" in lines[0] and "missing" in lines[1] and "certificate 1e-07" in lines[2]


def test_check_refuses_other_settings(tmp_path, capsys):
    rep = load_script("reproduce")
    committed = json.loads(QUICK_REFERENCE.read_text())
    assert _check(rep, tmp_path, committed, committed, "--steps", "5") == 2
    assert "steps 5 vs the reference's 3" in capsys.readouterr().err
    other = copy.deepcopy(committed)
    other["settings"]["limit"] = 4
    assert _check(rep, tmp_path, other, committed) == 2
    assert "limit 4 vs the reference's 5" in capsys.readouterr().err
    assert rep.main(["--check", str(tmp_path / "missing.json")]) == 2


def test_exact_in_comes_from_the_export_records(tmp_path):
    """The "exact in" column is read from `lotaqaf export` records (here written by hand): an engine counts when
    its greedy continuations equal lotaqaf's on every prompt; the rows of an artifact class take their width's
    checked row's result; LoRA-type rows read their own unmerged export."""
    rep = load_script("reproduce")

    def run(name, records):
        d = tmp_path / name
        d.mkdir()
        for fmt, engines in records.items():
            (d / f"export-{fmt}.json").write_text(json.dumps({"engines": engines}))
        return str(d)

    ok, off = {"checked": True, "prompts": 8, "same_continuations": 8}, {"checked": True, "prompts": 8,
                                                                           "same_continuations": 7}
    rows = [{"method": "scales", "bits": 2, "run": run("s", {"gptq": {"gptqmodel": ok}, "torchao": {"transformers": off}})},
            {"method": "lota_int", "bits": 2, "run": "unused"},
            {"method": "lota", "bits": 2, "run": run("l", {"gptq": {"gptqmodel_peft": ok}, "torchao": {"transformers": ok}})},
            {"method": "zeros", "bits": 2},
            {"method": "lora", "bits": 2, "run": run("r", {"gptq-adapter": {"gptqmodel_peft": ok}})},
            {"method": "qalora", "bits": 2, "run": run("q", {"gptq": {"gptqmodel_peft": {"checked": False}},
                                                             "torchao": {"transformers": off}})}]
    res = {"rows": rows}
    rep.engine_checks(res, None)
    got = {r["method"]: r["exact_in"] for r in res["rows"]}
    assert got == {"scales": ["gptqmodel (gptq)"], "lota_int": ["gptqmodel (gptq)"],
                   "lota": ["gptqmodel_peft (gptq)", "transformers (torchao)"],
                   "zeros": ["gptqmodel_peft (gptq)", "transformers (torchao)"],
                   "lora": ["gptqmodel_peft (gptq)"], "qalora": "none"}
    assert rows[1]["exact_in_from"] == "INT2 scales (PEQA)" and "INT2 LoTA-QAF" in res["exact_in_note"]


@pytest.mark.parametrize("argv, expected", [
    ([], "python scripts/reproduce.py"),
    (["--sweep-bits", "2", "--precision", "auto"], "python scripts/reproduce.py --sweep-bits 2"),
    (["--quick", "--steps", "3", "--precision", "fp32"], "python scripts/reproduce.py --quick --steps 3 --precision fp32"),
])
def test_the_recorded_command_parses_back(argv, expected):
    """The command a results file records is what --check re-parses: the defaults leave no flag behind."""
    rep = load_script("reproduce")
    cmd = rep.command_line(rep.parse_args(argv))
    assert cmd == expected
    assert rep.command_line(rep.parse_args(cmd.split()[2:])) == cmd
