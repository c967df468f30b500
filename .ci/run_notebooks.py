"""Re-execute notebooks and write their outputs back in place: what `make notebooks` runs.

    python .ci/run_notebooks.py                     # every notebook in nbs/ (names starting with _ skipped)
    python .ci/run_notebooks.py nbs/tutorial.ipynb  # just these

Each notebook runs top to bottom in a fresh kernel with `IN_TEST` unset (the laptop size), `HF_HUB_OFFLINE=1`, a
fixed `PYTHONHASHSEED` and, before its first cell, a hidden seeding cell (`seed_everything(0)`) and
`plotly.io.renderers.default = "plotly_mimetype"` (figures stored as plotly JSON, never with plotly.js). Cells
flagged `#| internet` or `#| gpu` (or `#| eval: false`) are not run and keep no outputs.

After a notebook ran:
* every plotly figure output gets a static PNG beside its JSON (`image/png` in the same output, rendered by kaleido
  with a local Chrome/Chromium, 700x450, palette-quantised) so GitHub and the HTML docs show it;
* `metadata.sae_nb` records `code_hash` (see `code_hash`: tests/test_outputs.py fails when the code changed after
  the outputs were made), when, where and how long it ran;
* the file is written back (only if nobody changed it meanwhile) and cleaned with nbdev_clean's rules, which keep
  outputs (`clear_all = False` and `allowed_metadata_keys = sae_nb` in settings.ini).

A failing notebook is reported and left as it was; the exit status is 1 if any failed.
"""
from __future__ import annotations

import argparse, base64, copy, datetime, hashlib, io, json, os, platform, re, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
META_KEY = "sae_nb"
SKIP_FLAGS = ("internet", "gpu")
PNG_SIZE = (700, 450)
PLOTLY_MIME = "application/vnd.plotly.v1+json"

PREAMBLE = """\
import os as _os, warnings as _warnings
import plotly.io as _pio
_pio.renderers.default = "plotly_mimetype"
try:
    from sae_nb.config import seed_everything as _seed
    _seed(0)
except Exception as _e:  # a notebook that runs before the package exists still runs
    import random as _random; _random.seed(0)
del _os, _warnings, _pio
"""


def code_hash(nb) -> str:
    "sha256 of a notebook's code cells, in order (trailing whitespace of each cell ignored): what its outputs came from."
    h = hashlib.sha256()
    for c in nb["cells"]:
        if c["cell_type"] != "code": continue
        src = c["source"] if isinstance(c["source"], str) else "".join(c["source"])
        h.update(src.rstrip().encode("utf-8") + b"\n\x1e\n")
    return h.hexdigest()


_DIRECTIVE = re.compile(r"^\s*#\s*\|\s*(.*?)\s*$")


def directives(source: str) -> list[str]:
    "The nbdev directives (`#| ...`) at the top of a code cell, e.g. ['internet'] or ['eval: false']."
    out = []
    for line in source.splitlines():
        m = _DIRECTIVE.match(line)
        if m: out.append(m.group(1)); continue
        if line.strip(): break
    return out


def skipped(cell, skip_flags=SKIP_FLAGS) -> bool:
    "True for a code cell `make notebooks` does not run: flagged with one of `skip_flags`, or `#| eval: false`."
    if cell["cell_type"] != "code": return False
    ds = directives(cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"]))
    return any(d in skip_flags or d.replace(" ", "") == "eval:false" for d in ds)


def machine() -> str:
    "A short description of the machine (no host or user names): CPU model, cores, OS, torch version."
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"): cpu = line.split(":", 1)[1].strip(); break
    except OSError: pass
    try:
        import torch
        tv = torch.__version__ + (", cuda" if torch.cuda.is_available() else "")
    except Exception: tv = "no torch"
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.machine()}, Python {platform.python_version()}, torch {tv}"


# --- static images of plotly figures ------------------------------------------------------------------------------
_kaleido_started = False


def _start_kaleido():
    global _kaleido_started
    if _kaleido_started: return
    try:
        import kaleido
    except ImportError:
        sys.exit("make notebooks needs kaleido (pip install 'kaleido>=1', in the dev extras) to save PNGs of figures")
    try:
        kaleido.start_sync_server(silence_warnings=True)
        _kaleido_started = True
    except Exception as e:
        sys.exit(f"kaleido could not start a browser ({e}). It needs Chrome or Chromium: `apt-get install chromium` "
                 "on Debian/Ubuntu, or `plotly_get_chrome` (downloads Chrome), or set BROWSER_PATH to a Chrome binary.")


def _optimise_png(png: bytes) -> bytes:
    "A palette PNG (<= 256 colours) of `png`: plots have few colours, so this is usually 2-4x smaller and looks the same."
    try:
        from PIL import Image
    except ImportError:
        return png
    im = Image.open(io.BytesIO(png)).convert("RGB")
    out = io.BytesIO()
    im.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, "PNG", optimize=True)
    return out.getvalue() if out.tell() < len(png) else png


def figure_png(fig_json: dict, size=PNG_SIZE) -> bytes:
    "PNG bytes of a plotly figure given as its JSON (the `application/vnd.plotly.v1+json` output), at `size` pixels."
    import warnings
    import plotly.io as pio
    _start_kaleido()
    warnings.filterwarnings("ignore", message="The kopts argument is ignored")
    fig = pio.from_json(json.dumps(fig_json), skip_invalid=True)
    layout = fig_json.get("layout", {})
    w = min(int(layout.get("width") or size[0]), 1000)
    h = min(int(layout.get("height") or size[1]), 1000)
    return _optimise_png(pio.to_image(fig, format="png", width=w, height=h, scale=1))


def add_pngs(nb) -> int:
    "Add an `image/png` beside every plotly figure output of `nb` (in place); returns how many."
    n = 0
    for c in nb["cells"]:
        for o in c.get("outputs", []):
            data = o.get("data", {})
            if PLOTLY_MIME in data:
                data["image/png"] = base64.b64encode(figure_png(data[PLOTLY_MIME])).decode("ascii")
                n += 1
    return n


# --- execution ----------------------------------------------------------------------------------------------------
def kernel_env() -> dict:
    env = dict(os.environ)
    env.pop("IN_TEST", None)
    env.update(HF_HUB_OFFLINE="1", PYTHONHASHSEED="0", TOKENIZERS_PARALLELISM="false", OMP_WAIT_POLICY="PASSIVE",
               PYTHONWARNINGS=env.get("PYTHONWARNINGS", ""), PYDEVD_DISABLE_FILE_VALIDATION="1")
    return env


def execute(path: Path, timeout: int, skip_flags=SKIP_FLAGS):
    "Run notebook `path` in a fresh kernel; returns (notebook with outputs, seconds). Raises on a failing cell."
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    run = copy.deepcopy(nb)
    run.cells = [nbformat.v4.new_code_cell(PREAMBLE)] + [c for c in run.cells if not skipped(c, skip_flags)]
    os.environ.update(kernel_env()); os.environ.pop("IN_TEST", None)
    # Widget state is NOT stored (store_widget_state=False), on purpose. With it, nbviewer could redraw the saved
    # ipywidgets, but: (1) every plotly FigureWidget's state holds its own copy of plotly.js (the anywidget `_esm`
    # trait: ~5 MB in plotly 7), so 08_widgets' dozen figure widgets would add tens of MB, far over the 600 KB output
    # limit of tests/test_outputs.py and against "never embed plotly.js"; (2) the state goes in the notebook's
    # metadata, which nbdev_clean strips (settings.ini keeps only `sae_nb`); (3) GitHub does not render widgets
    # from saved state anyway. Notebooks that want a static view next to a widget display its figure or table as
    # an ordinary output (figures get PNGs, see `add_pngs`).
    client = NotebookClient(run, timeout=timeout, kernel_name="python3", allow_errors=False,
                            store_widget_state=False, resources={"metadata": {"path": str(path.parent)}})
    t0 = time.perf_counter()
    client.execute()
    secs = time.perf_counter() - t0
    outputs = {c.get("id"): c.get("outputs", []) for c in run.cells[1:]}
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs = outputs.get(c.get("id"), []) if not skipped(c, skip_flags) else []
            c.execution_count = None
    return nb, secs


def clean(path: Path):
    "nbdev_clean on one notebook, with the project's settings (outputs kept)."
    from nbdev.clean import nbdev_clean
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        nbdev_clean(fname=str(path))
    finally:
        os.chdir(cwd)


def run_one(path: Path, timeout: int, skip_flags=SKIP_FLAGS) -> tuple[bool, float, str]:
    import nbformat
    before = path.read_bytes()
    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        nb, secs = execute(path, timeout, skip_flags)
    except Exception as e:
        msg = str(e)
        return False, 0.0, msg[-3000:]
    n_png = add_pngs(nb)
    nb.metadata[META_KEY] = {
        "code_hash": code_hash(nb),
        "executed": started.strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": round(secs, 1),
        "machine": machine(),
        "load_average": round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None,
        "skipped_flags": list(skip_flags),
    }
    if path.read_bytes() != before:
        return False, secs, f"{path.name} changed on disk while it ran: outputs not written (run it again)"
    nbformat.write(nb, path)
    clean(path)
    return True, secs, f"{n_png} figure PNGs, {path.stat().st_size / 1024:.0f} KB"


def notebooks(args) -> list[Path]:
    if args: return [Path(a).resolve() for a in args]
    return sorted(p for p in NBS.glob("*.ipynb") if not p.name.startswith("_"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("notebooks", nargs="*", help="notebooks to run (default: every notebook in nbs/)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds allowed per cell")
    ap.add_argument("--skip-flags", default=" ".join(SKIP_FLAGS), help="cells with these nbdev flags are not run")
    a = ap.parse_args(argv)
    paths = notebooks(a.notebooks)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing: sys.exit(f"no such notebook: {', '.join(missing)} (give paths like nbs/tutorial.ipynb)")
    figure_png({"data": [{"type": "scatter", "x": [0, 1], "y": [0, 1]}], "layout": {}})  # fail now, not after an hour
    failed, total = [], time.perf_counter()
    for p in paths:
        ok, secs, note = run_one(p, a.timeout, tuple(a.skip_flags.split()))
        rel = p.relative_to(ROOT) if p.is_relative_to(ROOT) else p
        print(f"{'ok  ' if ok else 'FAIL'} {str(rel):32s} {secs:7.1f}s  {note if ok else ''}", flush=True)
        if not ok: failed.append(p); print(note, file=sys.stderr)
    print(f"{len(paths) - len(failed)} of {len(paths)} notebooks executed in {time.perf_counter() - total:.0f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
