"""Run every notebook in nbs/ as a test, the way `nbdev_test` does (cells flagged slow/internet/gpu skipped).

Each notebook runs in its own process so one notebook's models and threads cannot leak into the next.
"""
import os, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "nbs").glob("*.ipynb") if not p.name.startswith("_"))

RUNNER = """
import sys
from nbdev.test import test_nb
from nbdev.config import get_config
from pathlib import Path
ok, secs = test_nb(Path(sys.argv[1]), skip_flags=get_config().tst_flags.split(), basepath=sys.argv[2])
print(f"notebook time: {secs:.1f}s")
sys.exit(0 if ok else 1)
"""


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook(nb):
    # PASSIVE: idle OpenMP threads sleep instead of spinning, which keeps torch fast when cores are shared.
    env = dict(os.environ, IN_TEST="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_WAIT_POLICY="PASSIVE")
    r = subprocess.run([sys.executable, "-c", RUNNER, str(nb), str(ROOT)], cwd=nb.parent, env=env,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"{nb.name} failed:\n{r.stdout[-8000:]}\n{r.stderr[-8000:]}"
