"""One real-browser test: JupyterLab (headless, localhost) + Debian's Chromium, driven by Selenium.

The first test writes a small notebook that trains a tiny SAE on glassllm-en and shows a `FeatureExplorer`, opens it in
JupyterLab, runs all cells, then moves the feature slider with the keyboard and types into the linked text box, and
checks that the stats line, the slider readout and the plotly histogram (its title and SVG bars) change. The second
shows a `PromptFeaturesWidget` on the same SAE, types a new prompt (Enter) and checks that the shaded tokens and the
feature buttons follow it, then clicks a feature button and checks that the explorer and the ablation plot open on it.

Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (Debian: `apt-get install chromium chromium-driver`); skipped
with the reason when they (or selenium / jupyterlab) are absent. Every wait is bounded; the server is killed at the end.
"""
import json, os, re, secrets, shutil, signal, socket, subprocess, sys, tempfile, time, urllib.request
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("SAE_NB_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SAE_NB_CHROMEDRIVER", "/usr/bin/chromedriver")
ROOT = Path(__file__).resolve().parents[1]

SETUP = """\
from sae_nb.models import load_model
from sae_nb.data import load_corpus, tokenize_corpus
from sae_nb.activations import ActivationStore
from sae_nb.sae import SAEConfig
from sae_nb.train import TrainConfig, train_sae
from sae_nb.widgets import FeatureExplorer, FeatureActivationIndex

model = load_model("glassllm-en", device="cpu")
hook = "blocks.0.mlp.hook_post"
tokens = tokenize_corpus(load_corpus("pydoc"), model, context_size=32, max_tokens=32 * 24, show_progress=False)
acts = next(iter(ActivationStore(model, tokens, hook, batch_size=24 * 31, shuffle=False, loop=False, show_progress=False)))
sae, history = train_sae(acts, SAEConfig(d_in=model.cfg.d_mlp, d_sae=128),
                         TrainConfig(batch_size=64, steps=60, lr=1e-3, lr_warmup_steps=5, b_dec_init="mean",
                                     show_progress=False, device="cpu"))
sae.eval()
index = FeatureActivationIndex(model, sae, tokens, hook)
start = int(index.density.argmax())  # fires often: a full histogram to start from
"""

EXPLORER = """\
# feature-explorer
explorer = FeatureExplorer(model, sae, tokens, hook, feature=start, n_examples=5, index=index)
explorer
"""

PROMPT = """\
# prompt-features
from sae_nb.widgets import PromptFeaturesWidget
pw = PromptFeaturesWidget(model, sae, hook, "import os", k=3, index=index)
pw
"""

# bounded waits (seconds)
SERVER_START, PAGE_LOAD, RUN_ALL, UI_CHANGE = 90, 120, 420, 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _notebook(widget_cell: str = EXPLORER) -> dict:
    cell = lambda src: dict(cell_type="code", execution_count=None, id=secrets.token_hex(4), metadata={}, outputs=[], source=src)
    return dict(nbformat=4, nbformat_minor=5, cells=[cell(SETUP), cell(widget_cell)],
                metadata=dict(kernelspec=dict(name="python3", display_name="Python 3 (ipykernel)", language="python")))


@pytest.fixture
def lab(tmp_path):
    "A JupyterLab server on a free localhost port serving a temp folder with the test notebook; yields (url, token)."
    for path, what in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromedriver")):
        if not os.access(path, os.X_OK):
            pytest.skip(f"{what} not found at {path}: apt-get install chromium chromium-driver (or set SAE_NB_{what.upper()})")
    pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
    pytest.importorskip("jupyterlab", reason="jupyterlab is not installed (pip install jupyterlab)")
    root = tmp_path / "root"; root.mkdir()
    (root / "explorer.ipynb").write_text(json.dumps(_notebook(), indent=1))
    (root / "prompt.ipynb").write_text(json.dumps(_notebook(PROMPT), indent=1))
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1",
               JUPYTER_CONFIG_DIR=str(tmp_path / "config"), JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               IPYTHONDIR=str(tmp_path / "ipython"))
    env.pop("IN_TEST", None)
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         "--ServerApp.port_retries=0", f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={token}",
         "--expose-app-in-browser", "--LabApp.news_url=None", "--LabApp.extension_manager=readonly"]
        + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START
        while True:
            if server.poll() is not None:
                pytest.fail(f"JupyterLab exited with {server.returncode}:\n{(tmp_path / 'jupyterlab.log').read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5) as r:
                    if r.status == 200: break
            except OSError: pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer within {SERVER_START}s:\n{(tmp_path / 'jupyterlab.log').read_text()[-4000:]}")
            time.sleep(0.5)
        yield url, token, tmp_path
    finally:
        # ask the server to shut down (it stops its kernels, which run in their own sessions), then make sure
        try:
            req = urllib.request.Request(f"{url}/api/shutdown", method="POST", headers={"Authorization": f"token {token}"})
            urllib.request.urlopen(req, timeout=10).close()
            server.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired): pass
        if server.poll() is None:
            try: os.killpg(server.pid, signal.SIGTERM)
            except ProcessLookupError: pass
            try: server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL); server.wait(timeout=10)
        log.close()


def chromium_driver(tmp_path, window="1400,2400", console_log=False):
    "Headless Chromium through chromedriver (no selenium-manager download); `console_log` keeps the browser's console."
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--window-size={window}", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(flag)
    if console_log: opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log")),
                              options=opts)
    driver.set_page_load_timeout(PAGE_LOAD)
    driver.set_script_timeout(30)
    driver.sae_nb_shots = tmp_path
    return driver


@pytest.fixture
def browser(tmp_path):
    "Headless Chromium for JupyterLab."
    driver = chromium_driver(tmp_path)
    try: yield driver
    finally: driver.quit()


def _wait(driver, condition, timeout, what, poll=0.5):
    "Poll `condition(driver)` every `poll` s until truthy (returned) or fail after `timeout` s saying `what`."
    from selenium.common.exceptions import WebDriverException
    deadline, last_error = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            value = condition(driver)
            if value: return value
        except WebDriverException as e: last_error = e
        time.sleep(poll)
    shots = getattr(driver, "sae_nb_shots", None)  # what the page showed, kept in pytest's tmp folder
    if shots is not None:
        try: driver.save_screenshot(str(shots / "timeout.png"))
        except WebDriverException: pass
    pytest.fail(f"Timed out after {timeout}s waiting for {what}" + (f" (last error: {last_error.msg})" if last_error else ""))


KERNEL_STATUS_JS = """
const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
return k ? k.status : null;
"""

HISTOGRAM_JS = """
const plots = [...document.querySelectorAll('.sae-nb-feature-explorer .js-plotly-plot')];
for (const p of plots) {
  const t = p.querySelector('.gtitle');
  if (t && t.textContent.includes('Nonzero activations'))
    return {title: t.textContent, bars: [...p.querySelectorAll('.trace.bars path')].map(e => e.getAttribute('d'))};
}
return null;
"""


def _state(driver):
    "The explorer's stats text, slider readout, text-box value and histogram (title + bar paths) as shown."
    from selenium.webdriver.common.by import By
    root = driver.find_element(By.CSS_SELECTOR, ".sae-nb-feature-explorer")
    return dict(stats=root.find_element(By.CSS_SELECTOR, ".sae-nb-stats").text,
                readout=root.find_element(By.CSS_SELECTOR, ".widget-readout").text,
                box=root.find_element(By.CSS_SELECTOR, ".widget-text input").get_attribute("value"),
                histogram=driver.execute_script(HISTOGRAM_JS))


def _feature(state) -> int:
    m = re.match(r"feature (\d+):", state["stats"])
    assert m, f"unexpected stats line {state['stats']!r}"
    return int(m.group(1))


def _open_and_run_all(browser, url, token, notebook):
    "Open `notebook` in JupyterLab, wait for its kernel, and run all its cells."
    browser.get(f"{url}/lab/tree/{notebook}?reset&token={token}")
    _wait(browser, lambda d: d.execute_script(KERNEL_STATUS_JS) == "idle", PAGE_LOAD, "the notebook's kernel to be idle")
    browser.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells');")


def test_feature_explorer_in_jupyterlab(lab, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    url, token, tmp_path = lab
    t0 = time.monotonic()
    _open_and_run_all(browser, url, token, "explorer.ipynb")
    # the explorer's widgets and its histogram render once both cells ran
    state0 = _wait(browser, lambda d: (s := _state(d)) and s["histogram"] and s["histogram"]["bars"] and s,
                   RUN_ALL, "the FeatureExplorer to render with a histogram")
    f0 = _feature(state0)
    assert state0["readout"] == str(f0) and state0["box"] == str(f0), state0
    assert f"Feature {f0}:" in state0["histogram"]["title"], state0

    # 1. keyboard: one step right on the slider's handle
    handle = browser.find_element(By.CSS_SELECTOR, ".sae-nb-feature-explorer .noUi-handle")
    handle.click()
    handle.send_keys(Keys.ARROW_RIGHT)
    state1 = _wait(browser, lambda d: (s := _state(d)) and s["stats"] != state0["stats"]
                   and s["histogram"] and f"Feature {f0 + 1}:" in s["histogram"]["title"] and s,
                   UI_CHANGE, f"the explorer to redraw for feature {f0 + 1} after the arrow key")
    assert _feature(state1) == f0 + 1
    assert state1["readout"] == str(f0 + 1) and state1["box"] == str(f0 + 1), state1  # linked
    assert state1["histogram"]["bars"] != state0["histogram"]["bars"], "the histogram's bars did not change"

    # 2. the linked text box: type the first feature back, Enter
    box = browser.find_element(By.CSS_SELECTOR, ".sae-nb-feature-explorer .widget-text input")
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(f0), Keys.ENTER)
    state2 = _wait(browser, lambda d: (s := _state(d)) and s["stats"] == state0["stats"]
                   and s["histogram"] and f"Feature {f0}:" in s["histogram"]["title"] and s,
                   UI_CHANGE, f"the explorer to redraw for feature {f0} after typing it")
    assert state2["readout"] == str(f0), state2  # the slider followed the text box
    assert state2["histogram"]["bars"] == state0["histogram"]["bars"], "the same feature should draw the same histogram"
    browser.save_screenshot(str(tmp_path / "explorer.png"))  # kept in pytest's tmp folder, for a look
    print(f"browser test: {time.monotonic() - t0:.1f}s in the browser, features {f0} -> {f0 + 1} -> {f0}")


PROMPT_JS = """
const root = document.querySelector('.sae-nb-prompt-features');
if (!root) return null;
const tokens = [...root.querySelectorAll('.sae-nb-prompt-tokens .sae-nb-token')].map(e => e.textContent.replace(/\\u00a0/g, ' '));
const buttons = [...root.querySelectorAll('.sae-nb-feature-button')].filter(b => b.offsetParent !== null).map(b => b.textContent);
const stats = root.querySelector('.sae-nb-feature-explorer .sae-nb-stats');
const titles = [...root.querySelectorAll('.js-plotly-plot .gtitle')].map(t => t.textContent);
return {tokens, buttons, stats: stats ? stats.textContent : null, titles};
"""


def test_prompt_features_in_jupyterlab(lab, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    url, token, tmp_path = lab
    t0 = time.monotonic()
    _open_and_run_all(browser, url, token, "prompt.ipynb")
    state0 = _wait(browser, lambda d: (s := d.execute_script(PROMPT_JS)) and "".join(s["tokens"]).endswith("import os") and s,
                   RUN_ALL, "the PromptFeaturesWidget to render the prompt's tokens")
    assert state0["buttons"], f"no feature buttons: {state0}"  # the strongest token has features

    # 1. type a new prompt, Enter: the tokens and the buttons follow
    new = "def parse_args(argv):"
    box = browser.find_element(By.CSS_SELECTOR, ".sae-nb-prompt-features .sae-nb-prompt-box input")
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(new, Keys.ENTER)
    state1 = _wait(browser, lambda d: (s := d.execute_script(PROMPT_JS)) and "".join(s["tokens"]).endswith(new) and s,
                   UI_CHANGE, "the widget to show the typed prompt's tokens")
    assert len(state1["tokens"]) > len(state0["tokens"]), state1
    assert state1["buttons"] and all(re.match(r"\d+ \(", b) for b in state1["buttons"]), state1

    # 2. click the first feature button: the explorer and the ablation plot open on that feature
    feature = int(state1["buttons"][0].split(" ")[0])
    button = [b for b in browser.find_elements(By.CSS_SELECTOR, ".sae-nb-prompt-features .sae-nb-feature-button") if b.is_displayed()][0]
    button.click()
    state2 = _wait(browser, lambda d: (s := d.execute_script(PROMPT_JS)) and s["stats"] and s["stats"].startswith(f"feature {feature}:")
                   and any(f"feature {feature} ablated" in t for t in s["titles"]) and s,
                   UI_CHANGE, f"the explorer and the ablation plot to open on feature {feature}")
    browser.save_screenshot(str(tmp_path / "prompt.png"))
    print(f"browser test: {time.monotonic() - t0:.1f}s in the browser, prompt typed, feature {feature} opened")
