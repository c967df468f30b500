"""The static feature dashboard (12_dashboard, `sae_nb.dashboard`) and `sae_nb dashboard RUN_FOLDER` (10_cli).

The site is checked as files (every feature has its file, every data file parses, the numbers are the index's), the
command on a real (tiny) `sae_nb train` run folder, and every refusal before the long work. All on glassllm-en with a
small SAE and a few hundred tokens. The browser side is tests/test_browser_dashboard.py."""
import json
import math
import os
from pathlib import Path

import pytest
import torch

import sae_nb.cli as cli
import sae_nb.dashboard as dash
from sae_nb.config import SaeNbError
from sae_nb.data import load_corpus, tokenize_corpus
from sae_nb.models import load_model
from sae_nb.sae import SAE, SAEConfig

HOOK = "blocks.0.mlp.hook_post"
SPEC_KEYS = {"feature", "density", "max_act", "n_fired", "quantiles", "histogram", "top", "intervals", "logits_up", "logits_down",
             "neighbours", "cooccurrence", "roundtrip", "label", "label_score", "label_detail"}


@pytest.fixture(scope="module")
def glass():
    "(model, sae, tokens, index): glassllm-en, a seeded 48-feature SAE, 8 windows of 32 tokens, the index built on them."
    from sae_nb.features import build_feature_index
    model = load_model("glassllm-en", device="cpu")
    torch.manual_seed(0)
    sae = SAE.from_config(SAEConfig(d_in=model.cfg.d_mlp, d_sae=48, model_name="glassllm-en", hook_name=HOOK))
    sae.eval()
    tokens = tokenize_corpus(load_corpus("pydoc"), model, context_size=32, max_tokens=32 * 8, show_progress=False)
    index = build_feature_index(model, sae, tokens, HOOK, k_top=5, n_intervals=3, samples_per_interval=2, show_progress=False)
    return model, sae, tokens, index


@pytest.fixture(scope="module")
def site(glass, tmp_path_factory):
    model, sae, tokens, index = glass
    folder = tmp_path_factory.mktemp("site") / "dashboard"
    page = dash.write_dashboard(index, folder, title="glass test", prompts=["def f(x): return x"], model=model, sae=sae,
                                show_progress=False)
    assert page == folder / "index.html"
    return folder


def feature_file(site: Path, f: int) -> Path:
    return site / "features" / str(f // dash.FEATURES_PER_DIR) / f"{f}.js"


def close(a, b, rel=2e-3):
    "Equal up to the site's 4 significant digits (None for NaN)."
    if a is None or b is None or (isinstance(b, float) and not math.isfinite(b)): return a is None and (b is None or not math.isfinite(b))
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-6)


def test_every_feature_has_a_file_that_parses(glass, site):
    index = glass[3]
    files = sorted(p.name for p in (site / "features").rglob("*.js"))
    assert len(files) == index.d_sae == 48
    for f in range(index.d_sae):
        num, data = dash.read_site_data(feature_file(site, f))
        assert num == f and data["feature"] == f and SPEC_KEYS <= set(data), (f, set(data))
        json.dumps(data, allow_nan=False)  # strict JSON: no NaN
    for name in ("summary", "tokens", "prompts"):
        assert len(dash.read_site_data(site / "data" / f"{name}.js")) == 1
    assert json.loads((site / dash.SITE_MARKER).read_text())["d_sae"] == 48


def test_site_numbers_are_the_index_numbers(glass, site):
    index = glass[3]
    f = int(torch.as_tensor(index.density).argmax())
    want, (_, got) = index.feature(f), dash.read_site_data(feature_file(site, f))
    assert want["n_fired"] > 0 and got["top"], "the densest feature should fire"
    top_want, top_got = want["top"][0], got["top"][0]
    assert top_got["tokens"] == top_want["tokens"] and top_got["focus"] == top_want["focus"]
    assert (top_got["window"], top_got["pos"]) == (top_want["window"], top_want["pos"])
    assert all(close(a, b, rel=5e-3) for a, b in zip(top_got["acts"], top_want["acts"])) and close(top_got["act"], top_want["act"])  # 3 digits
    assert [n for n, _ in got["neighbours"]] == [int(n) for n, _ in want["neighbours"]]
    assert [t for t, _ in got["logits_up"]] == [t for t, _ in want["logits_up"]]
    (summary,) = dash.read_site_data(site / "data" / "summary.js")
    assert summary["d_sae"] == index.d_sae and summary["n_tokens"] == index.n_tokens
    assert all(close(a, float(b)) for a, b in zip(summary["density"], index.density))
    assert all(close(a, float(b)) for a, b in zip(summary["max_act"], index.max_act))
    assert summary["labels"] == [None if l is None else str(l) for l in index.labels]


def test_search_data_holds_the_tokens(glass, site):
    model, _, tokens, index = glass
    (table,) = dash.read_site_data(site / "data" / "tokens.js")
    seen = {model.to_single_str_token(int(t)) for t in tokens[:, 1:].flatten()}
    assert table and set(table) <= set(index.token_strs)
    assert len(set(table) & seen) >= 0.5 * len(seen), "most tokens of the indexed text should be searchable"
    tok = next(iter(table))
    want = index.token_lookup(tok, k=10)
    assert [r[0] for r in table[tok]] == [int(r[0]) for r in want]
    assert all(close(a[1], float(b[1])) for a, b in zip(table[tok], want))


def test_prompt_pages_are_the_models_features(glass, site):
    model, sae, _, index = glass
    (pages,) = dash.read_site_data(site / "data" / "prompts.js")
    assert [p["text"] for p in pages] == ["def f(x): return x"]
    want = index.features_on_text(model, sae, "def f(x): return x", k=5)
    assert [t["token"] for t in pages[0]["tokens"]] == [t["token"] for t in want]
    assert [[f for f, _ in t["features"]] for t in pages[0]["tokens"]] == [[int(f) for f, _ in t["features"]] for t in want]


def test_page_is_offline(site):
    page = (site / "index.html").read_text()
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page
    assert "fetch(" not in page and "XMLHttpRequest" not in page
    assert "<script src='data/summary.js'>" in page


def test_refusals_before_any_work(glass, tmp_path, monkeypatch):
    model, sae, _, index = glass
    mine = tmp_path / "mine"; mine.mkdir(); (mine / "notes.txt").write_text("user data")
    with pytest.raises(SaeNbError, match="not an sae_nb dashboard"): dash.write_dashboard(index, mine, show_progress=False)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "user data"
    (tmp_path / "file").write_text("x")
    with pytest.raises(SaeNbError, match="is a file"): dash.write_dashboard(index, tmp_path / "file", show_progress=False)
    with pytest.raises(SaeNbError, match="needs model= and sae="): dash.write_dashboard(index, tmp_path / "p", prompts=["hi"])
    with pytest.raises(SaeNbError, match="non-empty"): dash.write_dashboard(index, tmp_path / "p", prompts=[" "], model=model, sae=sae)
    with pytest.raises(SaeNbError, match="not a feature index"): dash.write_dashboard(object(), tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_rebuild_replaces_our_site_and_a_failed_build_keeps_it(glass, tmp_path, monkeypatch):
    index = glass[3]
    folder = tmp_path / "dash"
    dash.write_dashboard(index, folder, show_progress=False)
    (feature_file(folder, 0).parent / "999.js").write_text("stale")   # as if from a wider SAE before
    dash.write_dashboard(index, folder, title="second", show_progress=False)
    assert not (feature_file(folder, 0).parent / "999.js").exists()
    assert json.loads((folder / dash.SITE_MARKER).read_text())["title"] == "second"
    calls = {"n": 0}
    real = dash.site_feature
    def dies(view):
        calls["n"] += 1
        if calls["n"] > 10: raise KeyboardInterrupt
        return real(view)
    monkeypatch.setattr(dash, "site_feature", dies)
    with pytest.raises(KeyboardInterrupt): dash.write_dashboard(index, folder, title="third", show_progress=False)
    assert json.loads((folder / dash.SITE_MARKER).read_text())["title"] == "second"
    assert len(list((folder / "features").rglob("*.js"))) == index.d_sae
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dash"], "no half-built folder left behind"


def test_bulk_views_are_the_one_by_one_views(glass):
    "The site's path (`index.features(ids)`, chunked) gives exactly `feature(f)` for every feature, a dead one included."
    model, sae, tokens, index = glass
    from sae_nb.features import build_feature_index
    dead_sae = SAE.from_config(sae.cfg)
    dead_sae.load_state_dict(sae.state_dict())
    with torch.no_grad(): dead_sae.W_enc[:, 7] = 0; dead_sae.b_enc[7] = -1e3   # feature 7 can never fire
    ix = build_feature_index(model, dead_sae, tokens, HOOK, k_top=5, n_intervals=3, samples_per_interval=2, show_progress=False)
    assert int(ix.n_fired[7]) == 0 and int((ix.n_fired > 0).sum()) > 10
    assert ix.features() == [ix.feature(f) for f in range(ix.d_sae)]
    assert ix.features([7, 3, 7]) == [ix.feature(7), ix.feature(3), ix.feature(7)]
    views = list(dash._feature_views(ix, chunk=5))                      # chunks that do not divide d_sae
    assert [f for f, _ in views] == list(range(ix.d_sae)) and [v for _, v in views] == [ix.feature(f) for f in range(ix.d_sae)]
    assert any(iv["examples"] for v in ix.features() for iv in v["intervals"]), "intervals with examples were compared"


def _slow_build(index_dir, site, hold):
    "A build in another process whose file writes each sleep `hold` seconds (a big SAE, in short)."
    code = ("import sys, time; import sae_nb.dashboard as d; from sae_nb.features import FeatureIndex\n"
            "w = d._write_file\n"
            f"d._write_file = lambda p, t: (time.sleep({hold}), w(p, t))\n"
            f"d.write_dashboard(FeatureIndex.load({str(index_dir)!r}), {str(site)!r}, title='first', show_progress=False)\n")
    import subprocess, sys
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_builds_of_one_folder(glass, tmp_path):
    "A second build of a folder being built fails at once (another process, or another thread), and the first site is complete."
    import threading, time
    index = glass[3]
    index.save(tmp_path / "features")
    site = tmp_path / "dashboard"
    first = _slow_build(tmp_path / "features", site, hold=0.05)
    t0 = time.time()
    while not list(tmp_path.glob(".dashboard.building-*")):   # the first build holds the lock and is writing
        assert first.poll() is None and time.time() - t0 < 120, first.communicate()
        time.sleep(0.05)
    with pytest.raises(SaeNbError, match="dashboard folder .* is in use by another sae_nb process"):
        dash.write_dashboard(index, site, title="second", show_progress=False)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert json.loads((site / dash.SITE_MARKER).read_text())["title"] == "first"
    assert sorted(p.name for p in (site / "features").rglob("*.js")) == sorted(f"{f}.js" for f in range(index.d_sae))
    for f in range(index.d_sae): assert dash.read_site_data(feature_file(site, f))[0] == f
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dashboard", "features"], "no half-built folder left behind"
    # two threads of one process (where folder_lock is re-entrant): the second fails the same way
    started, release, errors = threading.Event(), threading.Event(), []
    real = dash._write_file
    def slow(p, t):
        started.set(); release.wait(30); real(p, t)
    dash._write_file = slow
    try:
        th = threading.Thread(target=lambda: dash.write_dashboard(index, site, title="thread", show_progress=False))
        th.start()
        assert started.wait(30)
        with pytest.raises(SaeNbError, match="being written by another thread"):
            dash.write_dashboard(index, site, title="second", show_progress=False)
    finally:
        release.set(); th.join(60); dash._write_file = real
    assert json.loads((site / dash.SITE_MARKER).read_text())["title"] == "thread"
    dash.write_dashboard(index, site, title="after", show_progress=False)   # once the builds are over, a new one runs
    assert json.loads((site / dash.SITE_MARKER).read_text())["title"] == "after"


def test_report_section(glass, tmp_path):
    index = glass[3]
    part = dash.report_features_html(index, "dashboard/index.html", n=5)
    rows = dash.top_features(index, 5, "max_act")
    assert len(rows) == 5 and [r["max_act"] for r in rows] == sorted((r["max_act"] for r in rows), reverse=True)
    assert f"dashboard/index.html#f/{rows[0]['feature']}" in part and "sae-nb-dashboard-link" in part
    other = tmp_path / "report.html"; other.write_text("<html>someone else's page</html>")
    assert not cli.add_features_to_report(other, part) and other.read_text() == "<html>someone else's page</html>"


def test_card_html_for_notebooks(glass):
    index = glass[3]
    f = int(torch.as_tensor(index.density).argmax())
    card = dash.feature_card_html(index.feature(f), n_tokens=index.n_tokens)
    assert f"Feature {f}" in card and "<svg" in card and "<script" not in card and "title='" in card


# ---- the command, on a run folder made by `sae_nb train` at tiny size

S = ["--model", "glassllm-en", "--batch-size", "64", "--context-size", "32", "--eval-windows", "2", "--width", "32"]


from test_edges_cli import one_line, run  # noqa: E402 (one in-process CLI runner for the tests)


def forbid(monkeypatch, *names):
    "Make the long work fail loudly: a refusal must come before it."
    import sae_nb.features as features
    def boom(*a, **k): raise AssertionError("long work started before the refusal")
    for n in names:
        monkeypatch.setattr(features if n == "build_feature_index" else cli, n, boom)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    code, _, err = run("train", *S, "--steps", 3, "--out", out)
    assert code == 0, err
    return out


def test_held_out_windows_are_the_runs_evaluation_windows(run_folder):
    # what run_train evaluated on: the last --eval-windows windows of the corpus tokenised for the run
    model = load_model("glassllm-en", device="cpu")
    sae = SAE.load(run_folder / "sae")
    m = json.loads((run_folder / "metrics.json").read_text())
    need = cli._tokens_needed(m["steps"] * m["batch_size"], 32, 2)
    eval_tokens = tokenize_corpus(load_corpus("pydoc"), model, context_size=32, max_tokens=need, show_progress=False)[-2:]
    held, n_eval = cli._held_out_windows(model, sae, m, 32 * 6)
    assert n_eval == 2 and held.shape == (6, 32)
    assert torch.equal(held[:2], eval_tokens)
    held_short, _ = cli._held_out_windows(model, sae, m, 10)   # fewer tokens than the evaluation windows: those still
    assert torch.equal(held_short, eval_tokens)


def test_dashboard_command_on_a_run(run_folder, monkeypatch):
    assert "No feature dashboard yet" in (run_folder / "report.html").read_text()   # the report sae_nb train wrote
    code, out, err = run("dashboard", run_folder, "--tokens", 128, "--prompt", "def f(x):", "--prompt", "the cat")
    assert code == 0, err
    site = run_folder / "dashboard"
    assert (site / "index.html").is_file() and (run_folder / "features" / "feature_index.json").is_file()
    assert len(list((site / "features").rglob("*.js"))) == 32
    (pages,) = dash.read_site_data(site / "data" / "prompts.js")
    assert [p["text"] for p in pages] == ["def f(x):", "the cat"]
    report = (run_folder / "report.html").read_text()
    assert "dashboard/index.html#f/" in report and "sae-nb-dashboard-link" in report and "No feature dashboard yet" not in report
    assert report.count("<!-- sae_nb:features -->") == 1
    # again: the saved index is reused (nothing is rebuilt), the site is replaced, the report keeps one section
    forbid(monkeypatch, "build_feature_index")
    code, out, err = run("dashboard", run_folder, "--out", run_folder / "dash2")
    assert code == 0, err
    assert (run_folder / "dash2" / "index.html").is_file()
    report = (run_folder / "report.html").read_text()
    assert report.count("<!-- sae_nb:features -->") == 1 and "dash2/index.html#f/" in report


def test_report_points_to_the_command_until_a_dashboard_exists():
    text = cli._features_section(None)
    assert text.startswith("<!-- sae_nb:features -->") and "sae_nb dashboard RUN_FOLDER" in text


@pytest.mark.parametrize("case", ["missing", "file", "no_sae", "unfinished", "foreign_out", "empty_prompt"])
def test_bad_run_folder_refused_before_work(case, tmp_path, run_folder, monkeypatch):
    forbid(monkeypatch, "load_model", "build_feature_index")
    argv = {"missing": [tmp_path / "nope"], "file": [tmp_path / "f.txt"], "no_sae": [tmp_path / "empty"],
            "unfinished": [tmp_path / "half"], "foreign_out": [run_folder, "--out", tmp_path / "mine"],
            "empty_prompt": [run_folder, "--prompt", ""]}[case]
    (tmp_path / "f.txt").write_text("x"); (tmp_path / "empty").mkdir(); (tmp_path / "half" / "checkpoints").mkdir(parents=True)
    (tmp_path / "mine").mkdir(); (tmp_path / "mine" / "keep.txt").write_text("mine")
    code, _, err = run("dashboard", *argv)
    line = one_line(err)
    expect = {"missing": "does not exist", "file": "is a file", "no_sae": "not a finished run folder",
              "unfinished": "--resume", "foreign_out": "not an sae_nb dashboard", "empty_prompt": "non-empty"}[case]
    assert code == 2 and expect in line, line
    assert (tmp_path / "mine" / "keep.txt").read_text() == "mine" and sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["keep.txt"]


def test_features_section_added_to_a_report_written_before_it_existed(tmp_path):
    old = ("<!doctype html><html><head><meta charset='utf-8'><title>sae_nb: standard SAE on m h</title></head><body><h1>x</h1>"
           "<h2>Run and metrics</h2><table></table><h2>Where the time went</h2><table></table></body></html>")
    report = tmp_path / "report.html"; report.write_text(old)
    assert cli.add_features_to_report(report, "<h2>Features</h2><p>one</p>")
    text = report.read_text()
    assert text.index("<p>one</p>") < text.index("Where the time went") and text.count("<!-- sae_nb:features -->") == 1
    assert cli.add_features_to_report(report, "<h2>Features</h2><p>two</p>")
    text = report.read_text()
    assert "<p>two</p>" in text and "<p>one</p>" not in text and text.count("<!-- sae_nb:features -->") == 1
    assert text.replace(text[text.index("<!-- sae_nb:features -->"):text.index("<!-- /sae_nb:features -->") + len("<!-- /sae_nb:features -->")], "") == old


def test_index_of_another_sae_refused(run_folder, tmp_path, monkeypatch):
    # e.g. the run trained on (--resume) after its index was built: same width and hook, other weights
    import shutil
    from sae_nb.features import build_feature_index
    run2 = tmp_path / "run"
    shutil.copytree(run_folder, run2, ignore=shutil.ignore_patterns("dashboard", "dash2", "features", ".sae_nb.lock"))
    model = load_model("glassllm-en", device="cpu")
    torch.manual_seed(1)
    other = SAE.from_config(SAEConfig(d_in=model.cfg.d_mlp, d_sae=32, model_name="glassllm-en", hook_name=HOOK)); other.eval()
    tokens = tokenize_corpus(load_corpus("pydoc"), model, context_size=32, max_tokens=64, show_progress=False)
    build_feature_index(model, other, tokens, HOOK, show_progress=False).save(run2 / "features")
    forbid(monkeypatch, "load_model", "build_feature_index")
    code, _, err = run("dashboard", run2)
    line = one_line(err)
    assert code == 2 and "index of another SAE" in line and "move" in line, line
    assert not (run2 / "dashboard").exists()
