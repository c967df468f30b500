"""Build README.md from nbs/index.ipynb: execute it, drop `#| hide` cells and nbdev directive lines, render markdown."""
from pathlib import Path
import os, sys

import nbformat
from nbconvert import MarkdownExporter
from nbconvert.preprocessors import ExecutePreprocessor

ROOT = Path(__file__).resolve().parents[1]


def main():
    nb = nbformat.read(ROOT / "nbs" / "index.ipynb", as_version=4)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ExecutePreprocessor(timeout=1200, kernel_name="python3").preprocess(nb, {"metadata": {"path": str(ROOT / "nbs")}})
    cells = []
    for c in nb.cells:
        lines = c.source.splitlines()
        if c.cell_type == "code" and any(l.strip().replace(" ", "") in ("#|hide", "#|exporti") for l in lines):
            continue
        if c.cell_type == "code":
            c.source = "\n".join(l for l in lines if not l.lstrip().startswith("#|"))
        cells.append(c)
    nb.cells = cells
    body, _ = MarkdownExporter().from_notebook_node(nb)
    (ROOT / "README.md").write_text(body)
    print(f"wrote README.md ({len(body)} chars)")


if __name__ == "__main__":
    sys.exit(main())
