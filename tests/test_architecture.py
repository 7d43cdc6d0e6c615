"""The shape the architecture promises, checked so that it stays true:

- no module in stages/ imports another stage module; core/ imports nothing from io/, stages/, eval/
  or transformers; the package has no import cycle (read from the source, every import counted);
- every module sits in a layer of docs/architecture.md's table and imports nothing of a higher rank;
- a chained `lotaqaf train` loads the quantized base from disk at most once;
- every key of every recipe is read by the code that runs it;
- no top-level folder of the checkout shadows a package of the ecosystem from the repository root
  (where `python -m`, pytest and torchrun put it first on sys.path): `import kernels` is Hugging
  Face's package, which transformers imports while it loads a model.
"""

import ast
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from lotaqaf_cli.config import compose, group_options, validate

PKG = Path(__file__).resolve().parents[1] / "lotaqaf_cli"


# --------------------------------------------------------------------------- imports

def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> every module it imports (absolute names; third-party ones by their top-level name)."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    out = {}
    for mod, path in modules.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name if a.name.startswith("lotaqaf_cli") else a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module
                if not target.startswith("lotaqaf_cli"):
                    deps.add(target.split(".")[0])
                    continue
                for a in node.names:  # `from . import ui` imports the module lotaqaf_cli.ui
                    deps.add(f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target)
        out[mod] = deps - {mod}
    return out


def test_import_rules():
    graph = _imports()
    assert "lotaqaf_cli.stages.train" in graph and "lotaqaf_cli.core.ternary" in graph  # the reader works
    bad = []
    for mod, deps in graph.items():
        if mod.startswith("lotaqaf_cli.stages."):
            bad += [(mod, d) for d in deps if d.startswith("lotaqaf_cli.stages.")]
        if mod.startswith("lotaqaf_cli.core"):
            bad += [(mod, d) for d in deps if d == "transformers" or
                    d.startswith(("lotaqaf_cli.io", "lotaqaf_cli.stages", "lotaqaf_cli.eval", "lotaqaf_cli.commands",
                                  "lotaqaf_cli.chain", "lotaqaf_cli.session", "lotaqaf_cli.cli",
                                  "lotaqaf_cli.config", "lotaqaf_cli.ui"))]
    assert not bad, bad


DOC = PKG.parent / "docs" / "architecture.md"


def layer_table(doc: Path = DOC) -> list[tuple[int, str, list[str]]]:
    """(rank, layer, modules) from the table under "## Layers" in docs/architecture.md: a module is a name
    (`ui.py` -> lotaqaf_cli.ui) or a package and all below it (`io/` -> lotaqaf_cli.io.*)."""
    text = doc.read_text().split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].isdigit():
            names = []
            for entry in cells[2].replace("`", " ").split():
                name = entry.removesuffix(".py").removesuffix("/")
                name = "lotaqaf_cli" if name == "__init__" else f"lotaqaf_cli.{name.replace('/', '.')}"
                names.append(name + ".*" if entry.endswith("/") else name)
            rows.append((int(cells[0]), cells[1], names))
    return rows


def rank_of(module: str, rows) -> int | None:
    found = [r for r, _, names in rows for n in names
             if module == n.removesuffix(".*") or (n.endswith(".*") and module.startswith(n[:-1]))]
    return found[0] if len(found) == 1 else None


def upward_imports(graph: dict[str, set[str]], rows) -> list[str]:
    """Every import of a module from a layer of higher rank, and every module no row (or two) names."""
    bad = [f"{m}: in no layer of docs/architecture.md (or in two)" for m in graph if rank_of(m, rows) is None]
    for mod, deps in graph.items():
        r = rank_of(mod, rows)
        for d in deps:
            rd = rank_of(d, rows) if d.startswith("lotaqaf_cli") else None
            if r is not None and rd is not None and rd > r:
                bad.append(f"{mod} (rank {r}) imports {d} (rank {rd})")
    return sorted(bad)


def test_layer_order():
    rows = layer_table()
    assert [r for r, _, _ in rows] == list(range(len(rows))) and rows[0][1] == "core", rows
    bad = upward_imports(_imports(), rows)
    assert not bad, "\n".join(bad)


def test_the_layer_order_catches_an_upward_import():
    rows = [(0, "core", ["lotaqaf_cli.core.*"]), (1, "io", ["lotaqaf_cli.io.*"]), (2, "cli", ["lotaqaf_cli.cli"])]
    graph = {"lotaqaf_cli.io.a": {"lotaqaf_cli.core.q", "torch"}, "lotaqaf_cli.cli": {"lotaqaf_cli.io.a"}}
    assert upward_imports(graph, rows) == []
    graph["lotaqaf_cli.io.a"].add("lotaqaf_cli.cli")
    graph["lotaqaf_cli.extra"] = set()
    assert upward_imports(graph, rows) == ["lotaqaf_cli.extra: in no layer of docs/architecture.md (or in two)",
                                           "lotaqaf_cli.io.a (rank 1) imports lotaqaf_cli.cli (rank 2)"]


def test_no_import_cycle():
    imports = _imports()
    graph = {m: {d for d in deps if d in imports} for m, deps in imports.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_rules_catch_a_violation(tmp_path, monkeypatch):
    """The reader sees function-level and relative imports (so the rules above can fail)."""
    fake = tmp_path / "lotaqaf_cli"
    (fake / "stages").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "stages" / "__init__.py").write_text("")
    (fake / "stages" / "a.py").write_text("def f():\n    from . import b\n")
    (fake / "stages" / "b.py").write_text("from .a import f\n")
    monkeypatch.setattr(__import__(__name__), "PKG", fake)
    with pytest.raises(AssertionError, match="stages"):
        test_import_rules()
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_import_cycle()


# --------------------------------------------------------------------------- no name of ours shadows another's

ROOT = PKG.parent
SHADOW_PROBE = """
import importlib.util, sys
import torch, transformers
root = sys.argv[2]
for name in ("kernels", "scripts", "tests", "recipes"):
    spec = importlib.util.find_spec(name)
    where = spec.origin if spec is not None else None
    print(name, where if where and where != "namespace" else ("namespace" if spec else "absent"))
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
print("logits", tuple(model(torch.tensor([[1, 2, 3]])).logits.shape))
"""


def test_no_top_level_folder_shadows_an_installed_package(tmp_path):
    from tiny_models import tiny_model_dir

    # Only lotaqaf_cli is a regular package at the top; kernels/ holds lotaqaf_kernels one level down.
    regular = sorted(d.name for d in ROOT.iterdir() if d.is_dir() and (d / "__init__.py").exists())
    assert regular == ["lotaqaf_cli"], regular
    assert (ROOT / "kernels" / "lotaqaf_kernels" / "__init__.py").is_file()

    model = tiny_model_dir(tmp_path / "model")
    res = subprocess.run([sys.executable, "-c", SHADOW_PROBE, str(model), str(ROOT)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    found = dict(line.split(" ", 1) for line in res.stdout.splitlines())
    assert found["logits"] == "(1, 3, 256)", res.stdout
    for name in ("scripts", "tests", "recipes"):  # at most a namespace portion, which any installed package beats
        assert found[name] in ("absent", "namespace") or not found[name].startswith(str(ROOT)), found
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed (transformers < 5.25 does not need it)")
    assert found["kernels"] not in ("absent", "namespace"), found
    assert not found["kernels"].startswith(str(ROOT) + "/kernels"), found


# --------------------------------------------------------------------------- the base is loaded once

def test_chain_loads_the_base_at_most_once(tmp_path, monkeypatch):
    import lotaqaf_cli.io.checkpoint as ckpt
    from lotaqaf_cli.commands import run_command

    monkeypatch.chdir(tmp_path)
    reads = []
    real = ckpt.read_safetensors
    monkeypatch.setattr(ckpt, "read_safetensors", lambda p: (reads.append(Path(p).parent), real(p))[1])

    def chain(run_dir):
        cfg = compose(["recipe=smoke", f"run.dir={run_dir}", "optim.steps=2"])
        validate(cfg)
        reads.clear()
        run_command("train", cfg)
        return json.loads((tmp_path / run_dir / "quantize.json").read_text())["checkpoint"]

    # quantizes: the base never comes from disk; the merged checkpoint's two decoder-layer shards once each
    # (the certificate's from-disk half, one layer at a time)
    chain("runs/first")
    assert len(reads) == 2 and all(r.name.startswith(".merged.tmp-") for r in reads), reads
    base = Path(chain("runs/second"))  # the cached base: read once, then handed from stage to stage
    assert [r.resolve() for r in reads].count(base.resolve()) == 1, reads
    assert len(reads) == 3 and all(r.name.startswith(".merged.tmp-") for r in reads[1:]), reads


# --------------------------------------------------------------------------- every recipe key is read

# Keys no run reads through the config object, with the reason.
UNREAD_ALLOWED = {"description": "shown by `lotaqaf recipes`, which reads it from the recipe file"}


def _leaf_keys(cfg: DictConfig, prefix="") -> set[str]:
    out = set()
    for k, v in cfg.items():
        out |= _leaf_keys(v, f"{prefix}{k}.") if isinstance(v, DictConfig) else {f"{prefix}{k}"}
    return out


@pytest.fixture
def key_reads(monkeypatch):
    """Full keys that lotaqaf's own code reads from a config (not omegaconf's internal reads)."""
    import sys

    seen = set()
    originals = {name: getattr(DictConfig, name) for name in ("__getattr__", "__getitem__", "get")}

    def tracking(name):
        def read(self, key, *args):
            caller = sys._getframe(1).f_code.co_filename
            # validation reads every key; a key counts as used only where the run uses it
            used = "lotaqaf_cli" in caller and Path(caller).name != "config.py"
            if used and isinstance(key, str) and not key.startswith("_"):
                try:
                    seen.add(self._get_full_key(key))
                except Exception:
                    pass
            return originals[name](self, key, *args)
        return read

    for name in originals:
        monkeypatch.setattr(DictConfig, name, tracking(name))
    return seen


@pytest.mark.slow
def test_every_recipe_key_is_read(tmp_path, monkeypatch, key_reads):
    from tiny_models import corpus, tiny_model_dir

    from lotaqaf_cli.commands import run_command

    monkeypatch.chdir(tmp_path)
    tiny = tiny_model_dir(tmp_path / "tiny")
    (tmp_path / "text.txt").write_text("\n".join(corpus()) + "\n")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"instruction": a, "output": b}) + "\n"
                                                  for a, b in zip(corpus()[::2], corpus()[1::2], strict=True)))
    (tmp_path / "gsm8k.jsonl").write_text(json.dumps({"question": "What is 1 + 2?", "answer": "1 + 2 = 3\n#### 3"})
                                          + "\n")
    (tmp_path / "sql.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "Write a SQL query."},
                                                                  {"role": "assistant", "content": "SELECT 1"}]}) + "\n")
    (tmp_path / "viggo.jsonl").write_text(json.dumps({"meaning_representation": "inform(name[A])", "target": "A."}) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "mc.jsonl").write_text(json.dumps({"q": "The sky is", "choices": [" blue", " red"], "a": 0}) + "\n")
    (tmp_path / "tasks" / "mc.yaml").write_text(
        f"task: lotaqaf_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{a}}'\nmetric_list:\n  - metric: acc\n")
    small = ["quant.batch_size=4", "calib.n_samples=4", "calib.seq_len=32", "ppl.n_samples=2", "ppl.seq_len=32",
             "optim.steps=2", "optim.batch_size=2", "data.n_samples=4", "data.source_len=32", "data.target_len=16"]
    commands = [
        ("train", ["recipe=smoke", "stages=[quantize,train,ppl,merge,eval]", "eval.tasks=[ppl]"]),
        ("train", ["recipe=smoke", "adapter=lora", "stages=[quantize,train]", "run.dir=runs/lora"]),
        ("train", ["recipe=smoke", f"model.path={tiny}", "calib=file", f"calib.path={tmp_path / 'text.txt'}",
                   "ppl.source=file", f"ppl.path={tmp_path / 'text.txt'}", "data=jsonl",
                   f"data.path={tmp_path / 'train.jsonl'}", "stages=[quantize,train,ppl]", "run.dir=runs/tiny",
                   *small]),
        ("merge", ["recipe=smoke", "run.dir=runs/tiny"]),
        ("merge", ["recipe=smoke", "run.dir=runs/tiny", "merge.unmerge=true"]),
        ("eval", ["recipe=smoke", "run.dir=runs/tiny", "eval.model=adapter", "eval.tasks=[ppl]"]),
        ("eval", ["recipe=smoke", f"eval.model={tiny}", "eval.tasks=[mmlu,gsm8k,sql,viggo,lotaqaf_tiny_mc]",
                  "eval.limit=1", "eval.engine=fast", f"eval.gsm8k_file={tmp_path / 'gsm8k.jsonl'}",
                  f"eval.sql_file={tmp_path / 'sql.jsonl'}", f"eval.viggo_file={tmp_path / 'viggo.jsonl'}",
                  "eval.max_length=200", f"eval.lm_eval_include={tmp_path / 'tasks'}"]),
        ("export", ["recipe=smoke", "run.dir=runs/tiny", "export.format=hf16"]),
    ]
    for command, overrides in commands:
        cfg = compose(overrides)
        validate(cfg, command)
        torch.manual_seed(0)
        run_command(command, cfg)
    assert (tmp_path / "evals" / "eval-tiny.json").is_file() and (tmp_path / "runs/tiny/export-hf16").is_dir()

    unread = {}
    for recipe in group_options("recipe"):
        keys = _leaf_keys(compose([f"recipe={recipe}"])) | _leaf_keys(compose([f"recipe={recipe}", "adapter=lora"]))
        missing = sorted(keys - key_reads - set(UNREAD_ALLOWED))
        if missing:
            unread[recipe] = missing
    assert not unread, unread
