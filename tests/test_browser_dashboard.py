"""The static dashboard in a real browser: `index.html` opened from disk (file://, no server, no network) in headless
Chromium driven by Selenium. Opens a feature's card (tokens shaded, the value on hover), sorts the list by density
(both ways) and by label, searches by token, follows links from the search results, the prompt page and the
type-text page, and checks the browser logged no error (e.g. a data file that failed to load).

Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (Debian: `apt-get install chromium chromium-driver`) and
selenium, as tests/test_browser.py; skipped with the reason when they are absent. Every wait is bounded.
"""
import json, os, time
from pathlib import Path

import pytest
import torch

from test_browser import _wait as _browser_wait, chromium_driver

CHROMIUM = os.environ.get("SAE_NB_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SAE_NB_CHROMEDRIVER", "/usr/bin/chromedriver")
PAGE_LOAD, UI_CHANGE = 60, 20   # bounded waits (seconds)
HOOK = "blocks.0.mlp.hook_post"
PROMPT = "def f(x): return x"


def _need_browser():
    for path, what in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromedriver")):
        if not os.access(path, os.X_OK):
            pytest.skip(f"{what} not found at {path}: apt-get install chromium chromium-driver (or set SAE_NB_{what.upper()})")
    pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    "(folder, index): a dashboard of a seeded 64-feature SAE on glassllm-en, indexed on 8 windows of 32 tokens, with one prompt page."
    _need_browser()
    from sae_nb.dashboard import write_dashboard
    from sae_nb.data import load_corpus, tokenize_corpus
    from sae_nb.features import build_feature_index
    from sae_nb.models import load_model
    from sae_nb.sae import SAE, SAEConfig
    model = load_model("glassllm-en", device="cpu")
    torch.manual_seed(0)
    sae = SAE.from_config(SAEConfig(d_in=model.cfg.d_mlp, d_sae=64, model_name="glassllm-en", hook_name=HOOK)); sae.eval()
    tokens = tokenize_corpus(load_corpus("pydoc"), model, context_size=32, max_tokens=32 * 8, show_progress=False)
    index = build_feature_index(model, sae, tokens, HOOK, k_top=5, n_intervals=3, samples_per_interval=2, show_progress=False)
    folder = tmp_path_factory.mktemp("site") / "dashboard"
    write_dashboard(index, folder, title="browser test", prompts=[PROMPT], model=model, sae=sae, show_progress=False)
    return folder, index


@pytest.fixture
def browser(tmp_path):
    "Headless Chromium (tests/test_browser.py's driver), keeping the browser's console log."
    _need_browser()
    driver = chromium_driver(tmp_path, window="1400,1600", console_log=True)
    try: yield driver
    finally: driver.quit()


def _wait(driver, condition, timeout, what):
    return _browser_wait(driver, condition, timeout, what, poll=0.2)


ROWS_JS = "return [...document.querySelectorAll('#feature-list tbody tr')].map(r => [+r.dataset.feature, r.dataset.density === '' ? null : +r.dataset.density, r.querySelector('.lbl').textContent]);"
CARD_JS = """
const c = document.querySelector('#card'); if (!c) return null;
const ex = c.querySelector('#top-examples .ex');
return {feature: +c.dataset.feature,
        first: ex ? [...ex.querySelectorAll('.tok')].map(s => ({text: s.textContent, title: s.title, shaded: !!s.style.background, focus: s.classList.contains('focus')})) : null,
        text: c.textContent};
"""


def _card(driver, f):
    return _wait(driver, lambda d: (c := d.execute_script(CARD_JS)) and c["feature"] == f and c, UI_CHANGE, f"the card of feature {f}")


def test_dashboard_from_disk(site, browser):
    from selenium.webdriver.common.by import By
    folder, index = site
    t0 = time.monotonic()
    browser.get((folder / "index.html").as_uri())
    rows = _wait(browser, lambda d: d.execute_script(ROWS_JS), PAGE_LOAD, "the feature list")
    assert [r[0] for r in rows] == list(range(index.d_sae)), "starts in feature order"
    assert browser.find_element(By.ID, "list-count").text.startswith(f"{index.d_sae} of {index.d_sae} features")

    # sort by density: densest first; again: the other way
    density = [float(v) for v in torch.as_tensor(index.density)]
    browser.find_element(By.ID, "sort-density").click()
    rows = _wait(browser, lambda d: (r := d.execute_script(ROWS_JS)) and r[0][0] != 0 and r, UI_CHANGE, "the list sorted by density")
    shown = [r[1] for r in rows]
    assert shown == sorted(shown, reverse=True), shown
    assert abs(shown[0] - max(density)) <= 1e-3 * max(density) and rows[0][0] == max(range(len(density)), key=lambda f: (density[f], -f))
    browser.find_element(By.ID, "sort-density").click()
    rows = _wait(browser, lambda d: (r := d.execute_script(ROWS_JS)) and r[0][1] <= r[-1][1] and r, UI_CHANGE, "the list sorted by density, ascending")
    assert [r[1] for r in rows] == sorted(r[1] for r in rows)
    browser.find_element(By.ID, "sort-label").click()
    rows = _wait(browser, lambda d: d.execute_script(ROWS_JS), UI_CHANGE, "the list sorted by label")
    labels = [r[2].lower() for r in rows if r[2]]
    assert labels == sorted(labels) and all(r[2] for r in rows[:len(labels)]), "labelled features first, alphabetically"

    # open the densest feature from the list: its card, the top example's tokens shaded, the value on hover (title)
    f = max(range(len(density)), key=lambda g: (density[g], -g))
    browser.find_element(By.CSS_SELECTOR, "#sort-density").click()
    link = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, f"#feature-list tr[data-feature='{f}'] a"), UI_CHANGE, "its row")
    link.click()
    card = _card(browser, f)
    assert browser.current_url.endswith(f"#f/{f}")
    want = index.feature(f)["top"][0]
    assert [t["text"] for t in card["first"]] == [s.replace("\n", "↵").replace("\t", "⇥") for s in want["tokens"]]
    focus = [t for t in card["first"] if t["focus"]]
    assert len(focus) == 1 and focus[0]["shaded"] and focus[0]["title"].startswith(json.dumps(want["tokens"][want["focus"]]) + ": ")
    value = float(focus[0]["title"].rsplit(": ", 1)[1])
    assert abs(value - want["acts"][want["focus"]]) <= 0.01 * abs(want["acts"][want["focus"]])
    assert "Top activations" in card["text"] and "Samples from activation intervals" in card["text"]
    assert browser.find_elements(By.CSS_SELECTOR, "#card svg.hist rect"), "the histogram's bars"

    # search by token: the focus token of that example, typed without its leading space
    tok = want["tokens"][want["focus"]]
    browser.find_element(By.ID, "token-search").send_keys(tok.strip())
    browser.find_element(By.ID, "token-go").click()
    res = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#token-results table"), UI_CHANGE, "the token search results")
    expect = [int(r[0]) for r in index.token_lookup(tok, k=10)]
    assert expect, f"{tok!r} fired the densest feature, so some feature is listed for it"
    tables = browser.execute_script("return [...document.querySelectorAll('#token-results .box')].map(b => [b.querySelector('h4').textContent, [...b.querySelectorAll('a.flink')].map(a => +a.dataset.feature)]);")
    assert [fs for h, fs in tables if h == f"token {json.dumps(tok)}"] == [expect], tables
    res[0].find_element(By.CSS_SELECTOR, "a.flink").click()
    _card(browser, expect[0])

    # the prompt page: per token the features the model gave, each a link to its card
    browser.find_element(By.ID, "nav-prompts").click()
    links = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#prompt-0 a.flink"), UI_CHANGE, "the prompt page")
    g = int(links[0].get_attribute("data-feature"))
    links[0].click()
    _card(browser, g)

    # the type-text page: corpus statistics per word, said so on the page
    browser.find_element(By.ID, "nav-text").click()
    box = _wait(browser, lambda d: d.find_element(By.ID, "text-input"), UI_CHANGE, "the type-text page")
    assert "cannot run the model" in browser.find_element(By.ID, "panel").text
    box.send_keys(tok.strip() + " zzqqxx")
    words = _wait(browser, lambda d: (w := d.find_elements(By.CSS_SELECTOR, "#text-results .word")) and len(w) == 2 and w, UI_CHANGE, "two looked-up words")
    assert words[0].find_elements(By.CSS_SELECTOR, "a.flink") and "not a token" in words[1].text

    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    print(f"dashboard browser test: {time.monotonic() - t0:.1f}s")
