"""Render every notebook in nbs/, with its committed outputs, into a local HTML site: what `make docs` runs.

    python .ci/build_docs.py [--out _docs]

No quarto (its PyPI package downloads binaries at build time, so it cannot be installed offline): each notebook
becomes `<out>/<name>.html` through nbconvert's HTML exporter, with nbdev's conventions applied (cells marked
`#| hide` left out, `#|` directive lines removed, `#| echo: false` / `#| hide_input` cells shown without their
code), plotly figures shown as their committed PNGs, a navigation bar on every page, and `<out>/index.html` made from
nbs/index.ipynb. The quarto site (`nbdev_docs`, the deploy workflow) is unchanged and builds from the same notebooks.
"""
from __future__ import annotations

import argparse, copy, html, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
PLOTLY_MIME = "application/vnd.plotly.v1+json"


def _flags(source: str) -> set[str]:
    out = set()
    for line in source.splitlines():
        m = re.match(r"^\s*#\s*\|\s*(.*?)\s*$", line)
        if m: out.add(m.group(1).replace(" ", "")); continue
        if line.strip(): break
    return out


def prepare(nb):
    "A copy of `nb` as the docs show it: hidden cells dropped, directives stripped, code of echo:false cells hidden."
    nb = copy.deepcopy(nb)
    cells = []
    for c in nb.cells:
        if c.cell_type == "code":
            flags = _flags(c.source)
            if flags & {"hide", "exporti"}: continue
            c.source = "\n".join(l for l in c.source.splitlines() if not re.match(r"^\s*#\s*\|", l)).strip("\n")
            if flags & {"echo:false", "hide_input"}: c.metadata["transient"] = {"remove_source": True}
            for o in c.get("outputs", []):
                if PLOTLY_MIME in o.get("data", {}) and "image/png" in o["data"]: o["data"].pop(PLOTLY_MIME)
        cells.append(c)
    nb.cells = cells
    return nb


def title(nb, fallback: str) -> str:
    for c in nb.cells:
        if c.cell_type == "markdown":
            m = re.search(r"^#\s+(.+)$", c.source, re.M)
            if m: return m.group(1).strip()
    return fallback


def notebooks() -> list[Path]:
    return sorted(p for p in NBS.glob("*.ipynb") if not p.name.startswith("_"))


def build(out: Path) -> list[Path]:
    "Write the site into `out`; returns the pages written (one per notebook, index.html for nbs/index.ipynb)."
    import nbformat
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import TagRemovePreprocessor
    out.mkdir(parents=True, exist_ok=True)
    paths = notebooks()
    nbs = {p: nbformat.read(p, as_version=4) for p in paths}
    pages = {p: ("index.html" if p.stem == "index" else f"{p.stem}.html") for p in paths}
    nav = " | ".join(f'<a href="{pages[p]}">{html.escape(p.stem)}</a>' for p in paths)
    banner = (f'<nav style="font-family:sans-serif;padding:8px 16px;border-bottom:1px solid #ddd;background:#f7f7f7">'
              f'<b>sae_nb</b> &nbsp; {nav}</nav>')
    exporter = HTMLExporter(template_name="lab")
    exporter.register_preprocessor(TagRemovePreprocessor(remove_input_tags={"remove_input"}), enabled=True)
    written = []
    for p in paths:
        nb = prepare(nbs[p])
        for c in nb.cells:  # echo:false cells: nbconvert removes the input of cells tagged remove_input
            if c.metadata.pop("transient", None): c.metadata.setdefault("tags", []).append("remove_input")
        body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": title(nb, p.stem)}})
        body = re.sub(r"(<body[^>]*>)", r"\1" + banner.replace("\\", "\\\\"), body, count=1)
        page = out / pages[p]
        page.write_text(body, encoding="utf-8")
        written.append(page)
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "_docs"), help="folder for the site (default: _docs)")
    a = ap.parse_args(argv)
    pages = build(Path(a.out))
    print(f"wrote {len(pages)} pages to {a.out}; open {Path(a.out) / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
