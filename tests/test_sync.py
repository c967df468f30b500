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
