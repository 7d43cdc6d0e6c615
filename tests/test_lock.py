"""scripts/lock.py: the lock written from a folder of installed packages (hand-built dist-info here), and
the check `make setup` runs after installing: the same set passes, another version or an unlocked
package fails with exit 2."""

from pathlib import Path

from cli_helpers import load_script


def _site(path: Path, pkgs: dict[str, str]) -> str:
    for name, version in pkgs.items():
        d = path / f"{name.replace('-', '_')}-{version}.dist-info"
        d.mkdir(parents=True)
        (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return str(path)


def test_lock_round_trip_and_check(tmp_path, capsys):
    lock = load_script("lock")
    site = _site(tmp_path / "site", {"Foo_Bar": "1.2", "torch": "2.13.0+cpu", "lotaqaf": "0.1.0",
                                     "setuptools": "65.5.0", "pip": "26.3"})
    path = tmp_path / "constraints.txt"
    lock.write(path, [site])
    pins = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]
    # canonical names, torch without its local label; lotaqaf itself and setuptools are not locked
    assert pins == ["foo-bar==1.2", "pip==26.3", "torch==2.13.0"]
    assert lock.check(path, [site]) == 0

    path.write_text(path.read_text().replace("foo-bar==1.2", "foo-bar==1.3"))
    assert lock.check(path, [site]) == 2
    assert "foo-bar 1.2 is installed, " in capsys.readouterr().err

    path.write_text(path.read_text().replace("foo-bar==1.3\n", ""))
    assert lock.check(path, [site]) == 2
    assert "foo-bar 1.2 is installed but not in" in capsys.readouterr().err
