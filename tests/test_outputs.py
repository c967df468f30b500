"""The committed notebooks show their results, and those results are current.

Every notebook in nbs/ is saved with the outputs of `make notebooks` (.ci/run_notebooks.py): these tests fail when a
notebook has no outputs, when a plotly figure has no static PNG beside it (GitHub and the docs show only the PNG),
when outputs are too big or embed plotly.js, when an output prints a path of the machine that made it, and when a
notebook's code changed after its outputs were made (its code hash no longer matches `metadata.sae_nb.code_hash`).
The fix for any of them is `make notebooks NB=nbs/<name>.ipynb` (or `make notebooks` for all), then commit.
"""
import base64, importlib.util, json, re, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "nbs").glob("*.ipynb") if not p.name.startswith("_"))

_spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / ".ci" / "run_notebooks.py")
run_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_notebooks)

# Notebooks allowed to have no outputs, with the reason. Empty: every notebook shows its results.
NO_OUTPUTS: dict[str, str] = {}
MAX_OUTPUT_BYTES = 600_000  # per notebook, all outputs together as JSON
PLOTLY_JS = ("plotly.js v", "window.PlotlyConfig", "cdn.plot.ly")  # signs of an embedded/linked plotly.js bundle
# A path of the machine that ran the notebook: a home or work folder, a site-packages file, a temp folder.
MACHINE_PATH = re.compile(r"(/home/[^/\s]+/|/Users/[^/\s]+/|/root/|/work/|/tmp/|site-packages|[A-Z]:\\\\Users\\\\)")


def _nb(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _outputs(nb):
    for c in nb["cells"]:
        for o in c.get("outputs", []):
            yield c, o


def _text(o) -> str:
    parts = [o.get("text", ""), o.get("traceback", "")]
    for k, v in o.get("data", {}).items():
        if k.startswith("text/") or k.endswith("json"): parts.append(v if isinstance(v, str) else json.dumps(v))
    return "".join("".join(p) if isinstance(p, list) else str(p) for p in parts)


def stale(nb) -> str | None:
    "Why `nb`'s outputs are not those of its current code (None when they are)."
    meta = nb.get("metadata", {}).get(run_notebooks.META_KEY)
    if not meta or "code_hash" not in meta: return "it was never run by `make notebooks` (no metadata.sae_nb.code_hash)"
    if meta["code_hash"] != run_notebooks.code_hash(nb): return "its code changed after its outputs were made"
    return None


def problems(nb) -> list[str]:
    "Everything wrong with `nb`'s stored outputs except staleness."
    out = []
    if not any(True for _ in _outputs(nb)): out.append("no outputs")
    size = sum(len(json.dumps(c.get("outputs", []))) for c in nb["cells"])
    if size > MAX_OUTPUT_BYTES: out.append(f"outputs are {size / 1e3:.0f} KB (limit {MAX_OUTPUT_BYTES / 1e3:.0f} KB)")
    for c, o in _outputs(nb):
        data = o.get("data", {})
        if run_notebooks.PLOTLY_MIME in data and "image/png" not in data:
            out.append(f"cell {c.get('id')}: a plotly figure without a PNG beside it")
        text = _text(o)
        if any(s in text for s in PLOTLY_JS): out.append(f"cell {c.get('id')}: plotly.js embedded or linked")
        m = MACHINE_PATH.search(text)
        if m: out.append(f"cell {c.get('id')}: prints a machine path ({text[max(0, m.start() - 40):m.end() + 40]!r})")
        if o.get("output_type") == "error": out.append(f"cell {c.get('id')}: an error output")
    return out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_current(path):
    if path.name in NO_OUTPUTS: return
    why = stale(_nb(path))
    assert why is None, f"{path.name}: outputs are stale: {why}. Run `make notebooks NB=nbs/{path.name}` and commit."


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_complete(path):
    if path.name in NO_OUTPUTS: return
    found = problems(_nb(path))
    assert not found, f"{path.name}: {found}. Run `make notebooks NB=nbs/{path.name}` and commit."


# --- the checks themselves can fail -------------------------------------------------------------------------------
def _toy_nb(code=("x = 1", "x")):
    cells = [{"cell_type": "markdown", "id": "m0", "metadata": {}, "source": "# toy"}]
    cells += [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None, "outputs": [], "source": s}
              for i, s in enumerate(code)]
    return {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def test_code_hash_sees_code_not_prose():
    nb = _toy_nb()
    h = run_notebooks.code_hash(nb)
    nb["cells"][0]["source"] = "# other prose"
    assert run_notebooks.code_hash(nb) == h
    nb["cells"][0]["source"] = "# toy"
    nb["cells"][1]["source"] = "x = 2"
    assert run_notebooks.code_hash(nb) != h
    nb["cells"][1]["source"] = ["x = 1", "\n"]  # list-of-lines form and trailing whitespace: same code
    assert run_notebooks.code_hash(nb) == h


def test_checks_flag_stale_missing_and_heavy_outputs():
    nb = _toy_nb()
    assert "never run" in stale(nb) and problems(nb) == ["no outputs"]
    nb["metadata"]["sae_nb"] = {"code_hash": run_notebooks.code_hash(nb)}
    nb["cells"][2]["outputs"] = [{"output_type": "display_data", "metadata": {},
                                  "data": {run_notebooks.PLOTLY_MIME: {"data": []}, "text/plain": "Figure"}}]
    assert stale(nb) is None
    assert problems(nb) == ["cell c1: a plotly figure without a PNG beside it"]
    nb["cells"][2]["outputs"][0]["data"]["image/png"] = "iVBORw0KGgo="
    assert problems(nb) == []
    nb["cells"][2]["outputs"].append({"output_type": "stream", "name": "stderr",
                                      "text": "/home/me/.venv/lib/python3.11/site-packages/torch/x.py:3: UserWarning"})
    assert "machine path" in problems(nb)[0]
    nb["cells"][2]["outputs"][-1] = {"output_type": "display_data", "metadata": {},
                                     "data": {"text/html": "<script>/** plotly.js v3.0.0 */" + "x" * MAX_OUTPUT_BYTES}}
    assert len(problems(nb)) == 2
    nb["cells"][1]["source"] = "x = 3"
    assert "changed" in stale(nb)


def test_directives_choose_skipped_cells():
    cell = lambda s: {"cell_type": "code", "source": s}
    assert run_notebooks.skipped(cell("#| internet\nload()"))
    assert run_notebooks.skipped(cell("#|gpu\nx"))
    assert run_notebooks.skipped(cell("#| eval: false\nx"))
    assert not run_notebooks.skipped(cell("#| slow\nx"))
    assert not run_notebooks.skipped(cell("x = 1\n#| internet"))  # a directive only counts at the top
    assert not run_notebooks.skipped({"cell_type": "markdown", "source": "#| internet"})


def _browser_or_skip():
    "Skip (saying why) where kaleido has no Chrome/Chromium to draw PNGs with; .ci/run installs Debian's chromium."
    try:
        import plotly.graph_objects as go, plotly.io as pio
        pio.to_image(go.Figure(), format="png", width=10, height=10)
    except Exception as e:
        pytest.skip(f"kaleido cannot draw PNGs here ({type(e).__name__}): install chromium (apt-get install chromium) "
                    "or run plotly_get_chrome; `make notebooks` needs it too")


def test_make_notebooks_on_a_toy(tmp_path):
    "The runner executes in a fresh kernel, skips #| internet, adds a PNG per figure, records the hash, stays clean."
    _browser_or_skip()
    nb = _toy_nb(("import os\nos.environ.get('IN_TEST', 'unset')",
                  "import plotly.graph_objects as go\ngo.Figure(go.Bar(x=[1, 2], y=[3, 1]))",
                  "#| internet\nraise SystemExit('must not run')"))
    path = tmp_path / "toy.ipynb"
    path.write_text(json.dumps(nb), encoding="utf-8")
    r = subprocess.run([sys.executable, str(ROOT / ".ci" / "run_notebooks.py"), str(path)], capture_output=True,
                       text=True, timeout=600, env={**__import__("os").environ, "IN_TEST": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    done = _nb(path)
    assert stale(done) is None and problems(done) == [], problems(done)
    code = [c for c in done["cells"] if c["cell_type"] == "code"]
    assert "'unset'" in code[0]["outputs"][0]["data"]["text/plain"]  # IN_TEST removed: the laptop size
    png = base64.b64decode(code[1]["outputs"][0]["data"]["image/png"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert code[2]["outputs"] == []
    assert all(c.get("execution_count") is None for c in code)
    before = path.read_text(encoding="utf-8")
    subprocess.run([str(Path(sys.executable).parent / "nbdev_clean"), "--fname", str(path)], cwd=ROOT, check=True)
    assert path.read_text(encoding="utf-8") == before, "nbdev_clean changed what make notebooks wrote"
