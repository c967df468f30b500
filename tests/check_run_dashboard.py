"""Check the dashboard of a real run in headless Chromium, opened from disk (file://, offline): every feature is
listed (through the list's "more" button), a feature card opens from its URL, search by token and the label filter
give results, sorting by density orders the list, and the browser logs no error.

    .venv/bin/sae_nb dashboard runs/<run>            # writes runs/<run>/dashboard/ (and runs/<run>/features/)
    .venv/bin/python tests/check_run_dashboard.py runs/<run>

Not collected by pytest (a run folder takes minutes to make); tests/test_browser_dashboard.py checks the same site
code on a small SAE in every test run. Needs chromium and chromedriver, as that test does.
"""
import sys, tempfile, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from test_browser import chromium_driver
from test_browser_dashboard import ROWS_JS, _card, _wait
from sae_nb.features import FeatureIndex


def check(run: Path):
    from selenium.webdriver.common.by import By
    run = run.resolve()
    index = FeatureIndex.load(run / "features")
    n = index.d_sae
    with tempfile.TemporaryDirectory() as tmp:
        d = chromium_driver(Path(tmp), window="1400,1600", console_log=True)
        try:
            t0 = time.monotonic()
            d.get((run / "dashboard" / "index.html").as_uri())
            _wait(d, lambda d: d.execute_script(ROWS_JS), 120, "the feature list")
            while d.find_element(By.ID, "more").is_displayed(): d.find_element(By.ID, "more").click()
            rows = d.execute_script(ROWS_JS)
            assert [r[0] for r in rows] == list(range(n)), f"{len(rows)} rows listed, want every one of {n}"
            labelled = [r for r in rows if r[2]]
            print(f"list: {len(rows)} features, {len(labelled)} labelled ({time.monotonic() - t0:.1f}s)")
            d.find_element(By.ID, "sort-density").click()
            by_density = _wait(d, lambda d: (r := d.execute_script(ROWS_JS)) and r[0][0] != 0 and r, 60, "sorted by density")
            dens = [r[1] for r in by_density]
            assert dens == sorted(dens, reverse=True), "sorted by density, densest first"
            f = n - 7  # a feature far down the list, opened by its address
            d.get((run / "dashboard" / "index.html").as_uri() + f"#f/{f}")
            card = _card(d, f)
            print(f"card of feature {f}: {card['text'][:120]!r}")
            word = labelled[0][2].strip("'\" ").split()[0]
            box = d.find_element(By.ID, "label-search"); box.clear(); box.send_keys(word)
            hits = _wait(d, lambda d: (r := d.execute_script(ROWS_JS)) and len(r) < n and r, 60, f"the label filter {word!r}")
            assert all(word.lower() in r[2].lower() or str(r[0]).startswith(word) for r in hits), hits[:5]
            print(f"label filter {word!r}: {len(hits)} features")
            d.find_element(By.ID, "token-search").send_keys("def"); d.find_element(By.ID, "token-go").click()
            res = _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#token-results a.flink"), 60, "features firing on 'def'")
            print(f"token search 'def': {len(res)} feature links")
            errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
            assert not errors, errors
            print(f"all checks passed on {n} features in {time.monotonic() - t0:.1f}s")
        finally: d.quit()


if __name__ == "__main__":
    check(Path(sys.argv[1]))
