"""The committed package is what nbdev_export makes of the notebooks, and the notebooks are nbdev_clean'd.

Both checks run on a scratch copy, so they never touch the working tree.
"""
import filecmp, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _copy_project(tmp_path):
    dst = tmp_path / "proj"
    dst.mkdir()
    for name in ("settings.ini", "setup.py", "README.md"):
        if (ROOT / name).exists(): shutil.copy(ROOT / name, dst / name)
    shutil.copytree(ROOT / "nbs", dst / "nbs", ignore=shutil.ignore_patterns(".ipynb_checkpoints", "_proc"))
    shutil.copytree(ROOT / "sae_nb", dst / "sae_nb", ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _tree_diff(a: Path, b: Path, pattern: str):
    names = sorted({p.relative_to(a).as_posix() for p in a.rglob(pattern)} | {p.relative_to(b).as_posix() for p in b.rglob(pattern)})
    return [n for n in names if not ((a / n).exists() and (b / n).exists() and filecmp.cmp(a / n, b / n, shallow=False))]


def test_package_in_sync_with_notebooks(tmp_path):
    dst = _copy_project(tmp_path)
    shutil.rmtree(dst / "sae_nb")
    r = subprocess.run([str(BIN / "nbdev_export")], cwd=dst, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    diff = _tree_diff(ROOT / "sae_nb", dst / "sae_nb", "*.py")
    assert not diff, f"sae_nb/ differs from what nbdev_export makes of nbs/ (run nbdev_export): {diff}"


def test_notebooks_clean(tmp_path):
    dst = _copy_project(tmp_path)
    r = subprocess.run([str(BIN / "nbdev_clean")], cwd=dst, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    diff = _tree_diff(ROOT / "nbs", dst / "nbs", "*.ipynb")
    assert not diff, f"notebooks are not clean (run nbdev_clean): {diff}"


def _ci_module(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, ROOT / ".ci" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_clean_keeps_outputs_and_run_metadata():
    "nbdev_clean must not strip what `make notebooks` saves: outputs and metadata.sae_nb (the code hash)."
    import configparser
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "settings.ini")
    assert cfg["DEFAULT"]["clear_all"].strip() == "False"
    assert "sae_nb" in cfg["DEFAULT"]["allowed_metadata_keys"].split()


def test_readme_in_sync_with_index():
    "README.md (and its images) is what .ci/build_readme.py makes of nbs/index.ipynb's committed outputs."
    diff = _ci_module("build_readme").stale()
    assert not diff, f"{diff} out of date with nbs/index.ipynb: run `make readme` (or `make notebooks`) and commit"


def test_readme_prints_no_warnings_or_paths():
    "The README's printed output holds no warnings and no file paths of the machine that built it."
    import re
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    outputs = "\n".join(l for l in text.splitlines() if l.startswith("    "))  # markdown's indented output blocks
    assert not re.search(r"\b\w*Warning\b|Traceback", outputs), "README prints a warning or traceback"
    assert not re.search(r"(/home/|/Users/|/root/|/work/|/tmp/|site-packages|[A-Z]:\\)", text), "README holds a machine path"


def test_docs_build_a_page_per_notebook(tmp_path):
    "`make docs` (.ci/build_docs.py) renders every notebook, with its outputs, into a page of a local site."
    build_docs = _ci_module("build_docs")
    pages = build_docs.build(tmp_path / "site")
    names = sorted(p.name for p in pages)
    expected = sorted("index.html" if p.stem == "index" else f"{p.stem}.html" for p in build_docs.notebooks())
    assert names == expected
    tut = (tmp_path / "site" / "tutorial.html").read_text(encoding="utf-8")
    assert 'href="05_train.html"' in tut  # the navigation bar
    import json, re
    assert not re.search(r'c1">#\s*\|', tut), "an nbdev directive line is shown in the code"
    nb = json.loads((ROOT / "nbs" / "tutorial.ipynb").read_text(encoding="utf-8"))
    if any("image/png" in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", [])):
        assert "data:image/png;base64" in tut  # committed figures are shown
