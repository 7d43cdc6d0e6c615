"""scripts/bench_peers.py without its side venv (the comparison itself needs gptqmodel, which CI does not
install): a missing venv is one line and exit 2; the widths parse as bits/group_size."""

from cli_helpers import load_script


def test_missing_side_venv_is_one_line_and_exit_2(tmp_path, capsys):
    bench = load_script("bench_peers")
    assert bench.main(["--gptqmodel-python", str(tmp_path / "no-venv" / "python")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no gptqmodel side venv" in err[0]


def test_widths_parse():
    bench = load_script("bench_peers")
    assert bench.parse_widths("4/64,3/64,2/32") == [(4, 64), (3, 64), (2, 32)]
