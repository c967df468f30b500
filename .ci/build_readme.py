"""Build README.md from nbs/index.ipynb's committed outputs: drop `#| hide` cells and nbdev directive lines, render
markdown, and write each output image to nbs/images/readme_<n>.png (linked from the README).

Nothing is executed here: `make notebooks` (or `.ci/run_notebooks.py nbs/index.ipynb`) runs the notebook and saves its
outputs, then this script renders them. `--check` builds in memory and exits 1 if README.md or an image differs
(tests/test_sync.py runs the same check).
"""
from pathlib import Path
import copy, re, sys

ROOT = Path(__file__).resolve().parents[1]
INDEX = ROOT / "nbs" / "index.ipynb"
IMAGES = ROOT / "nbs" / "images"


def _hidden(cell) -> bool:
    return cell.cell_type == "code" and any(l.strip().replace(" ", "") in ("#|hide", "#|exporti")
                                            for l in cell.source.splitlines())


def build(index: Path = INDEX) -> tuple[str, dict]:
    "README.md's text and its images {path relative to the repository: PNG bytes}, from `index`'s stored outputs."
    import nbformat
    from nbconvert import MarkdownExporter
    nb = nbformat.read(index, as_version=4)
    nb = copy.deepcopy(nb)
    nb.metadata["language_info"] = {"name": "python"}  # ```python fences (nbdev_clean drops language_info)
    nb.cells = [c for c in nb.cells if not _hidden(c)]
    for c in nb.cells:
        if c.cell_type == "code":
            c.source = "\n".join(l for l in c.source.splitlines() if not l.lstrip().startswith("#|"))
            for o in c.get("outputs", []):  # the PNG, not the plotly JSON (GitHub cannot show it)
                o.get("data", {}).pop("application/vnd.plotly.v1+json", None)
    body, resources = MarkdownExporter().from_notebook_node(nb)
    images = {}
    for i, (name, data) in enumerate(sorted(resources.get("outputs", {}).items())):
        if not name.endswith(".png"): continue
        rel = f"nbs/images/readme_{i}.png"
        images[rel] = data
        body = body.replace(f"]({name})", f"]({rel})")
    body = re.sub(r"\n{3,}", "\n\n", body).rstrip() + "\n"
    return body, images


def stale() -> list[str]:
    "The files `build` would change (README.md, images), or [] when the committed README is current."
    body, images = build()
    out = [] if (ROOT / "README.md").exists() and (ROOT / "README.md").read_text(encoding="utf-8") == body else ["README.md"]
    out += [rel for rel, data in images.items() if not (ROOT / rel).exists() or (ROOT / rel).read_bytes() != data]
    out += [p.relative_to(ROOT).as_posix() for p in IMAGES.glob("readme_*.png") if p.relative_to(ROOT).as_posix() not in images]
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--check" in argv:
        diff = stale()
        if diff: print(f"out of date with nbs/index.ipynb: {diff} (run .venv/bin/python .ci/build_readme.py)"); return 1
        return 0
    body, images = build()
    IMAGES.mkdir(parents=True, exist_ok=True)
    for p in IMAGES.glob("readme_*.png"):
        if p.relative_to(ROOT).as_posix() not in images: p.unlink()
    for rel, data in images.items(): (ROOT / rel).write_bytes(data)
    (ROOT / "README.md").write_text(body, encoding="utf-8")
    print(f"wrote README.md ({len(body)} chars, {len(images)} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
