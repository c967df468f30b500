"""Many SAEs from one activation stream (`train_saes`, `sae_nb sweep`) and the dead-feature window that fits the run.

Run: `HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/test_sweep.py`. What each case did before and does now is
in the table in tests/README.md.
"""
import dataclasses, io, json, math, os, signal, subprocess, sys, time, contextlib
from pathlib import Path

import pytest
import torch

from sae_nb.config import SaeNbError, read_json
from sae_nb.sae import SAE, SAEConfig
from sae_nb.train import TrainConfig, TrainingInterrupted, latest_checkpoint, train_sae, train_saes
from test_reliability import CHILD_ENV, InterruptingBatches, assert_same_sae, batches_of, make_data, one_thread  # noqa: F401 (fixture)

TESTS = Path(__file__).resolve().parent
TOPK = SAEConfig(architecture="topk", d_in=16, d_sae=48, k=4)
STANDARD = SAEConfig(architecture="standard", d_in=16, d_sae=32)
SET = [(TOPK, dict(name="topk")), (STANDARD, dict(name="standard", l1_coefficient=0.1, lr=3e-3))]


def run_cfg(out=None, **kw):
    "20 steps of 32 rows on the CPU; checkpoints only at the end unless asked."
    return TrainConfig(**{**dict(batch_size=32, steps=20, lr=1e-2, log_every=2, lr_warmup_steps=2, dead_feature_window=64,
                                 show_progress=False, device="cpu", seed=0, out_dir=out), **kw})


def data():
    return batches_of(make_data(1024), 32)


def same_history(a, b):
    "Histories equal but for the wall-clock column."
    return {k: v for k, v in a.items() if k != "elapsed_s"} == {k: v for k, v in b.items() if k != "elapsed_s"}


class Counting:
    "A re-iterable over batches that counts the batches handed out."
    def __init__(self, batches): self.batches, self.fetched = batches, 0
    def __iter__(self):
        for b in self.batches:
            self.fetched += 1
            yield b


def lone(data_fn, cfg, settings, tc):
    "The single run a sweep point stands for: `train_sae` with that SAE's own settings."
    own = {k: v for k, v in settings.items() if k != "name"}
    return train_sae(data_fn(), cfg, dataclasses.replace(tc, **own))


def test_each_batch_is_fetched_once_for_the_whole_set(one_thread):
    src = Counting(data())
    results = train_saes(src, SET, run_cfg())
    assert src.fetched == 20, src.fetched  # N separate runs fetch N x 20
    assert [h["step"][-1] for _, h in results] == [20, 20]


def test_one_config_is_train_sae_bit_for_bit(one_thread, tmp_path):
    (sae_set, h_set), = train_saes(data(), [TOPK], run_cfg(tmp_path / "set", checkpoint_every=5))
    sae, h = train_sae(data(), TOPK, run_cfg(tmp_path / "alone", checkpoint_every=5))
    assert_same_sae(sae_set, sae) and same_history(h_set, h)
    assert_same_sae(SAE.load(tmp_path / "set" / "sae_0" / "sae"), SAE.load(tmp_path / "alone" / "sae"))
    assert read_json(tmp_path / "set" / "sae_0" / "history.json") == h_set
    manifest = read_json(tmp_path / "set" / "sweep.json")
    assert manifest["format"] == "sae_nb.sweep" and [r["name"] for r in manifest["runs"]] == ["sae_0"]


def test_each_sweep_point_equals_its_lone_run(one_thread, tmp_path):
    results = train_saes(data(), SET, run_cfg(tmp_path / "sweep"))
    for (cfg, settings), (sae, history) in zip(SET, results):
        alone, h = lone(data, cfg, settings, run_cfg())
        assert_same_sae(sae, alone) and same_history(history, h)
        assert_same_sae(SAE.load(tmp_path / "sweep" / settings["name"] / "sae"), alone)
    assert results[1][1]["lr"][-1] != results[0][1]["lr"][-1] or results[1][1]["l1_coefficient"] != results[0][1]["l1_coefficient"]


def test_each_sweep_point_equals_its_lone_run_on_an_activation_store(one_thread):
    from sae_nb.activations import ActivationStore
    from sae_nb.data import load_corpus, tokenize_corpus
    from sae_nb.models import load_model
    model = load_model("glassllm-en", device="cpu")
    tokens = tokenize_corpus(load_corpus("pydoc", max_docs=30), model, context_size=32, max_tokens=32 * 24, show_progress=False)
    store = lambda: ActivationStore(model, tokens, "blocks.0.mlp.hook_post", batch_size=64, show_progress=False)
    d = store().d_in
    sweep = [(SAEConfig(architecture="topk", d_in=d, d_sae=2 * d, k=8), dict(name="k8")),
             (SAEConfig(architecture="standard", d_in=d, d_sae=2 * d), dict(name="l1", l1_coefficient=0.01, lr=1e-3))]
    tc = run_cfg(batch_size=64, steps=8, lr=1e-3, dead_feature_window=None)
    results = train_saes(store(), sweep, tc)
    for (cfg, settings), (sae, history) in zip(sweep, results):
        alone, h = lone(store, cfg, settings, tc)
        assert_same_sae(sae, alone) and same_history(history, h)


def test_an_interrupted_set_resumes_to_the_uninterrupted_set(one_thread, tmp_path):
    straight = train_saes(data(), SET, run_cfg(tmp_path / "straight", checkpoint_every=5))
    with pytest.raises(TrainingInterrupted, match=r"interrupted after step 13; checkpoint step_13 written in each of the 2 run folders"):
        train_saes(InterruptingBatches(data(), 13, "raise"), SET, run_cfg(tmp_path / "cut", checkpoint_every=5))
    for name in ("topk", "standard"): assert latest_checkpoint(tmp_path / "cut" / name).name == "step_13"
    resumed = train_saes(data(), SET, run_cfg(tmp_path / "cut", checkpoint_every=5, resume=True))
    for (a, ha), (b, hb) in zip(straight, resumed):
        assert_same_sae(a, b) and same_history(ha, hb)


def test_a_kill_between_two_saes_checkpoints_resumes_from_the_common_step(one_thread, tmp_path):
    straight = train_saes(data(), SET, run_cfg(tmp_path / "straight", checkpoint_every=5))
    with pytest.raises(TrainingInterrupted):
        train_saes(InterruptingBatches(data(), 13, "raise"), SET, run_cfg(tmp_path / "cut", checkpoint_every=5))
    # as if killed after the first SAE wrote step_13 and before the second did: its newest is step_10
    ck = tmp_path / "cut" / "standard" / "checkpoints"
    import shutil; shutil.rmtree(ck / "step_13"); (ck / "latest").write_text("step_10\n")
    resumed = train_saes(data(), SET, run_cfg(tmp_path / "cut", checkpoint_every=5, resume=True))
    for (a, ha), (b, hb) in zip(straight, resumed):
        assert_same_sae(a, b) and same_history(ha, hb)


def test_resume_refuses_another_set(one_thread, tmp_path):
    with pytest.raises(TrainingInterrupted):
        train_saes(InterruptingBatches(data(), 7, "raise"), SET, run_cfg(tmp_path / "cut", checkpoint_every=5))
    other = [SET[0], (STANDARD, dict(name="other"))]
    with pytest.raises(SaeNbError, match=r"Cannot resume .*started with the SAEs \['topk', 'standard'\]"):
        train_saes(data(), other, run_cfg(tmp_path / "cut", resume=True))
    with pytest.raises(SaeNbError, match="already holds a sweep"):
        train_saes(data(), SET, run_cfg(tmp_path / "cut"))


CHILD = r'''
import os, sys, time
import torch
torch.set_num_threads(1)
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from sae_nb.train import train_saes
from test_sweep import SET, data, run_cfg
out, block_at = Path(sys.argv[1]), int(sys.argv[2])
batches = data()
class Blocking:
    fired = False
    def __iter__(self):
        for i, b in enumerate(batches):
            if i == block_at and not self.fired:
                self.fired = True
                Path(str(out) + ".blocked").write_text(str(os.getpid()))
                while True: time.sleep(0.01)
            yield b
train_saes(Blocking(), SET, run_cfg(out, checkpoint_every=5))
'''


def test_a_sigkilled_set_resumes_to_the_uninterrupted_set(one_thread, tmp_path):
    out = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(out), "12", str(TESTS)], env=CHILD_ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not Path(str(out) + ".blocked").exists():
            assert child.poll() is None, child.communicate()
            assert time.time() < deadline, "the child never reached batch 12"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None: child.kill()
    for name in ("topk", "standard"): assert latest_checkpoint(out / name).name == "step_10"
    resumed = train_saes(data(), SET, run_cfg(out, checkpoint_every=5, resume=True))
    straight = train_saes(data(), SET, run_cfg(tmp_path / "straight", checkpoint_every=5))
    for (a, ha), (b, hb) in zip(straight, resumed):
        assert_same_sae(a, b) and same_history(ha, hb)


def test_bad_sets_are_refused_before_any_work(tmp_path):
    out = tmp_path / "never"
    cases = [([], "empty list"), (TOPK, "list of SAEConfigs"), ([(TOPK, dict(batch_size=64))], "shared by the whole set"),
             ([(TOPK, dict(name="a")), (STANDARD, dict(name="a"))], "same name"), ([(TOPK, dict(name="../up"))], "run folder name"),
             ([(TOPK, dict(lr=-1.0))], r"item 0 \(sae_0\): TrainConfig.lr"),
             ([TOPK, SAEConfig(architecture="topk", d_in=8, d_sae=16, k=2)], "same d_in")]
    for saes, expect in cases:
        with pytest.raises(SaeNbError, match=expect): train_saes(data(), saes, run_cfg(out if expect != "same d_in" else None))
    assert not out.exists() or not any(out.iterdir()) or expect == "same d_in"
    with pytest.raises(SaeNbError, match="W&B logging takes one SAE"):
        train_saes(data(), SET, run_cfg(wandb_project="p"))


# -- the dead-feature window fits the run -------------------------------------------------------------------------

def test_the_default_dead_window_fits_the_run():
    assert TrainConfig(steps=400, batch_size=1024).num_dead_feature_window == 400 * 1024 // 4   # the CLI's default run
    assert TrainConfig(steps=4000, batch_size=4096).num_dead_feature_window == 2_000_000        # long runs: the usual 2M
    assert TrainConfig(steps=6, batch_size=32).num_dead_feature_window == 4 * 32                # at least 4 batches
    assert TrainConfig(steps=6, batch_size=32, dead_feature_window=10).num_dead_feature_window == 10
    with pytest.raises(SaeNbError, match="dead_feature_window"): TrainConfig(dead_feature_window=0)


def test_dead_fraction_is_none_until_a_whole_window_has_passed(one_thread, tmp_path):
    sae = SAE.from_config(SAEConfig(d_in=16, d_sae=32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(): sae.b_enc[:16] = -1e4  # half the features can never fire
    _, h = train_sae(data(), sae, run_cfg(tmp_path / "run", steps=12, dead_feature_window=None, b_dec_init=None))
    window = 12 * 32 // 4 if 12 * 32 // 4 > 4 * 32 else 4 * 32  # 128 tokens = 4 steps
    assert [d is None for d in h["dead_fraction"]] == [t < window for t in h["tokens"]], (h["tokens"], h["dead_fraction"])
    assert all(d >= 0.5 for d in h["dead_fraction"] if d is not None), h["dead_fraction"]  # before: 0.0 throughout (2M window)
    assert read_json(tmp_path / "run" / "history.json")["dead_fraction"] == h["dead_fraction"]  # null in the file


# -- the command line ----------------------------------------------------------------------------------------------

def run_cli(*argv):
    from sae_nb.cli import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try: code = main(list(argv))
        except SystemExit as e: code = e.code
    return code, err.getvalue()


TINY = ["--model", "glassllm-en", "--context-size", "32", "--expansion", "1", "--steps", "12", "--batch-size", "128",
        "--eval-windows", "2", "--device", "cpu"]


def test_sweep_cli_end_to_end(one_thread, tmp_path):
    out = tmp_path / "sweep"
    code, err = run_cli("sweep", *TINY, "--architecture", "topk,standard", "--k", "4,8", "--l1-coefficient", "1", "--out", str(out))
    assert code == 0, err
    summary = read_json(out / "sweep.json")
    rows = summary["runs"]
    assert [r["name"] for r in rows] == ["topk-k4", "topk-k8", "standard-l1_1"], rows
    for r in rows:
        assert (out / r["folder"] / "sae").is_dir() and (out / r["folder"] / "history.json").is_file()
        assert r["metrics"]["n_tokens"] > 0 and math.isfinite(r["metrics"]["l0"]), r
        SAE.load(out / r["folder"] / "sae")
    assert 0 < rows[0]["metrics"]["l0"] <= 4 and 4 < rows[1]["metrics"]["l0"] <= 8
    page = (out / "sweep.html").read_text()
    assert page.count("plotly.js v") <= 1 and "Plotly.newPlot" in page and "topk-k8" in page
    # --resume of a finished sweep: nothing retrained, the summary rewritten
    code, err = run_cli("sweep", *TINY, "--architecture", "topk,standard", "--k", "4,8", "--l1-coefficient", "1", "--out", str(out), "--resume")
    assert code == 0, err
    code, err = run_cli("sweep", *TINY, "--architecture", "topk", "--k", "4", "--out", str(out))
    assert code == 2 and "already holds" in err, err


@pytest.mark.parametrize("argv, expect", [
    (["--architecture", "topk", "--k", "0"], "must be >= 1"),
    (["--architecture", "topk", "--k", "4,,8"], "empty"),
    (["--architecture", "topk,relu6"], "relu6"),
    (["--architecture", "standard", "--l1-coefficient", "1,-2"], ">= 0"),
    (["--architecture", "topk", "--k", "4,4"], "twice"),
    (["--architecture", "standard", "--k", "4,8"], "--k applies to"),
    (["--architecture", "topk", "--k", ",".join(str(k) for k in range(1, 202))], "SAEs"),
    (["--architecture", "topk", "--width", "40000000"], "need"),
])
def test_sweep_cli_refuses_bad_grids_before_any_work(tmp_path, argv, expect):
    out = tmp_path / "sweep"
    code, err = run_cli("sweep", *TINY, *argv, "--out", str(out))
    assert code == 2 and len(err.strip().splitlines()) == 1 and expect in err, err
    assert not out.exists() or not any(out.iterdir())


def test_sweep_dead_fractions_come_from_the_long_stream_with_saebench_core_per_sae(one_thread, tmp_path):
    # before: each SAE's dead_fraction came from the 2 x 31 held-out tokens, no token count, no saebench_core.json
    from sae_nb.cli import DEFAULT_CORPUS, DEFAULT_HOOK, _tokens_needed, main
    from sae_nb.data import bos_token_id, counted_positions, load_corpus, tokenize_corpus
    from sae_nb.eval import evaluate, feature_density
    from sae_nb.models import load_model
    out, printed, err = tmp_path / "sweep", io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(err):
        code = main(["sweep", *TINY, "--architecture", "topk", "--k", "4,8", "--out", str(out)])
    assert code in (0, None), err.getvalue()
    # the windows the CLI trained on and held out, rebuilt as it builds them
    model = load_model("glassllm-en", device="cpu")
    tokens = tokenize_corpus(load_corpus(DEFAULT_CORPUS), model, context_size=32, max_tokens=_tokens_needed(12 * 128, 32, 2),
                             show_progress=False)
    train_tokens, eval_tokens = tokens[:-2], tokens[-2:]
    n_stream = int(counted_positions(train_tokens, bos_token_id(model)).sum())  # under DENSITY_TOKENS: the whole stream
    rows = read_json(out / "sweep.json")["runs"]
    assert [r["name"] for r in rows] == ["topk-k4", "topk-k8"]
    for r in rows:
        folder = out / r["folder"]
        m, saved = r["metrics"], read_json(folder / "metrics.json")
        assert {k: saved[k] for k in m} == m  # the run folder's metrics.json holds the row's metrics
        sae = SAE.load(folder / "sae")
        alone = feature_density(model, sae, train_tokens, DEFAULT_HOOK, n_tokens=None)  # one SAE, its own stream
        assert m["density_n_tokens"] == alone["n_tokens"] == n_stream > 10 * m["n_tokens"]
        for key in ("dead_fraction", "dense_fraction", "dead_upper_bound", "unresolved_fraction"):
            assert m[key] == alone[key], (key, m[key], alone[key])
        held_out = evaluate(model, sae, eval_tokens, DEFAULT_HOOK)
        assert (m["eval_dead_fraction"], m["eval_dense_fraction"]) == (held_out["dead_fraction"], held_out["dense_fraction"])
        for key in ("l0", "explained_variance", "loss_recovered", "kl", "ce_sae", "ce_clean", "ce_zero", "ce_mean", "n_tokens"):
            assert m[key] == held_out[key], (key, m[key], held_out[key])  # the shared passes give each SAE's own numbers
        core = read_json(folder / "saebench_core.json")
        assert core["eval_type_id"] == "core" and core["eval_config"]["context_size"] == 32
        assert core["eval_result_unstructured"]["feature_density_n_tokens"] == n_stream
        assert abs(core["eval_result_metrics"]["misc_metrics"]["frac_alive"] - (1 - m["dead_fraction"])) < 1e-12
        assert len(core["eval_result_details"]) == sae.cfg.d_sae
    page = (out / "sweep.html").read_text()
    assert "<th>density_n_tokens</th>" in page and "<th>eval_dead_fraction</th>" in page and f"<td>{n_stream}</td>" in page
    assert "never fired in density_n_tokens tokens of the training windows" in page
    assert f"never fired in {n_stream:,} tokens of the training windows" in printed.getvalue(), printed.getvalue()
