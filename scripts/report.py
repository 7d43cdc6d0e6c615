"""Writing a results script's outputs (scripts/reproduce.py, scripts/ablate.py): <out>.json, <out>.md and
<out>.png, each through a temporary file; scripts/ is on sys.path when a script runs."""

from __future__ import annotations

from pathlib import Path

from lotaqaf_cli.io.files import atomic_file, write_json_atomic, write_text_atomic


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    pyplot().close(fig)


def write_results(res: dict, out: str | Path, markdown, chart) -> dict:
    """<out>.json (``res``), <out>.md (``markdown(res)``) and <out>.png (``chart(res, path)``); their paths."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out.with_suffix(".json"), res)
    write_text_atomic(out.with_suffix(".md"), markdown(res))
    chart(res, out.with_suffix(".png"))
    return {k: str(out.with_suffix(k)) for k in (".md", ".json", ".png")}
