"""Training at the edges: two runs on one folder, signals, runs killed before their first checkpoint, swapped or
damaged checkpoint files, activations of extreme scale. Plain pytest; the process tests start real Python children.

Run: `HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/test_edges_train.py`. What each case did before and does
now is in the table in tests/README.md.
"""
import math, os, re, shutil, signal, subprocess, sys, time, warnings
from pathlib import Path

import pytest
import torch

from sae_nb.config import LOCK_NAME, SaeNbError, load_safetensors_checked, read_json, save_safetensors_atomic, write_json_atomic
from sae_nb.sae import SAE, SAEConfig
from sae_nb.train import (TrainConfig, TrainingInterrupted, latest_checkpoint, run_folder_state, train_sae)
from test_reliability import CHILD_ENV, InterruptingBatches, assert_same_sae, batches_of, make_data, one_thread  # noqa: F401 (fixture)

TESTS = Path(__file__).resolve().parent
CFG = SAEConfig(architecture="topk", d_in=16, d_sae=48, k=4)
STEPS = 20


def run_cfg(out=None, **kw):
    "The settings every run here uses (20 steps of 32 rows; checkpoints only at the end unless asked)."
    return TrainConfig(**{**dict(batch_size=32, steps=STEPS, lr=1e-2, log_every=2, lr_warmup_steps=2, dead_feature_window=64,
                                 show_progress=False, device="cpu", seed=0, out_dir=out), **kw})


def data():
    return batches_of(make_data(1024), 32)


# A training run in a child process whose data blocks before batch `block_at` until a release file appears.
CHILD = r'''
import os, sys, time
import torch
torch.set_num_threads(1)
from pathlib import Path
sys.path.insert(0, sys.argv[4])
from sae_nb.sae import SAEConfig
from sae_nb.train import TrainingInterrupted, train_sae
from test_edges_train import CFG, data, run_cfg
out, block_at, checkpoint_every = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
batches = data()
class Blocking:
    "Re-iterable batches; on the first pass, waits before batch `block_at` (after that many steps) for the release file."
    fired = False
    def __iter__(self):
        for i, b in enumerate(batches):
            if i == block_at and not self.fired:
                self.fired = True
                Path(str(out) + ".blocked").write_text(str(os.getpid()))
                while not Path(str(out) + ".release").exists(): time.sleep(0.01)
            yield b
try: train_sae(Blocking(), CFG, run_cfg(out, checkpoint_every=checkpoint_every))
except TrainingInterrupted as e:
    print("INTERRUPTED", e.signal, e, flush=True); sys.exit(3)
print("DONE", flush=True)
'''


class Child:
    "A training run in a child process (see CHILD); `wait_blocked()` returns once it waits in its data."
    def __init__(self, tmp_path, out, block_at=-1, checkpoint_every=100):
        script = tmp_path / "child.py"
        script.write_text(CHILD)
        self.out = out
        self.proc = subprocess.Popen([sys.executable, str(script), str(out), str(block_at), str(checkpoint_every), str(TESTS)],
                                     env=CHILD_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    def wait_blocked(self, timeout=120):
        deadline = time.monotonic() + timeout
        while not Path(str(self.out) + ".blocked").exists():
            assert self.proc.poll() is None, f"the run ended before it blocked: {self.proc.communicate()}"
            assert time.monotonic() < deadline, "the run never reached its data"
            time.sleep(0.01)
    def release(self): Path(str(self.out) + ".release").write_text("go")
    def finish(self, timeout=120):
        stdout, stderr = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, stdout, stderr


# ---------------------------------------------------------------------------------------------------------------
# 8. Two runs on one out_dir
# ---------------------------------------------------------------------------------------------------------------
def test_a_second_run_on_the_same_folder_fails_at_once_and_the_first_finishes_intact(tmp_path):
    out = tmp_path / "run"
    first = Child(tmp_path, out, block_at=6)
    first.wait_blocked()  # the first run holds the folder, 6 steps in, no checkpoint yet
    t0 = time.monotonic()
    second = Child(tmp_path, out)  # the same run started again by mistake: never blocks
    code, stdout, stderr = second.finish()
    assert code == 1 and "is in use by another sae_nb process" in stderr and f"pid {first.proc.pid}" in stderr, (code, stdout, stderr[-2000:])
    assert "DONE" not in stdout and time.monotonic() - t0 < 60
    assert not (out / "sae").exists() and latest_checkpoint(out) is None  # the second run wrote nothing
    first.release()
    code, stdout, stderr = first.finish()
    assert code == 0 and "DONE" in stdout, stderr[-2000:]
    reference, _ = train_sae(data(), CFG, run_cfg(tmp_path / "reference"))
    assert_same_sae(SAE.load(out / "sae"), reference)
    assert read_json(out / "history.json")["step"] == list(range(2, STEPS + 1, 2))


def test_checkpoint_temp_folders_are_unique_so_writers_never_share_one(tmp_path):
    "A fixed-name `.step_N.tmp` made two writers collide (one deleted the other's); each write now gets its own."
    from sae_nb.train import _write_checkpoint
    root = tmp_path / "run" / "checkpoints"
    other = root / ".step_3.tmp"  # another process's checkpoint in progress, under the old fixed name
    other.mkdir(parents=True); (other / "trainer_state.json").write_text("{}")
    sae = SAE.from_config(CFG, generator=torch.Generator().manual_seed(0))
    _write_checkpoint(tmp_path / "run", 3, sae, {"step": 3}, {"marker": torch.zeros(2)}, 2)
    assert (other / "trainer_state.json").read_text() == "{}"  # untouched
    assert latest_checkpoint(tmp_path / "run").name == "step_3"


def test_stale_checkpoint_temp_folders_are_cleaned_when_a_run_takes_the_folder(tmp_path):
    out = tmp_path / "run"
    stale = out / "checkpoints" / ".step_20.a1b2c3.tmp"
    stale.mkdir(parents=True); (stale / "trainer_state.json").write_text("{torn")
    train_sae(data(), CFG, run_cfg(out))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_20"]


# ---------------------------------------------------------------------------------------------------------------
# 10. SIGTERM (schedulers, `kill`) checkpoints like Ctrl-C
# ---------------------------------------------------------------------------------------------------------------
def test_sigterm_checkpoints_the_step_in_flight_and_resume_is_exact(tmp_path):
    out = tmp_path / "run"
    child = Child(tmp_path, out, block_at=6, checkpoint_every=5)
    child.wait_blocked()  # 6 steps done, checkpoint step_5 on disk, batch 7 being fetched
    os.kill(child.proc.pid, signal.SIGTERM)  # what a scheduler or `kill` sends
    time.sleep(0.2)
    child.release()
    code, stdout, stderr = child.finish()
    assert code == 3 and "INTERRUPTED SIGTERM" in stdout and "interrupted after step 7 (SIGTERM); checkpoint" in stdout, (code, stdout, stderr[-2000:])
    assert latest_checkpoint(out).name == "step_7" and not (out / "sae").exists()
    resumed, _ = train_sae(data(), CFG, run_cfg(out, checkpoint_every=5, resume=True))
    reference, _ = train_sae(data(), CFG, run_cfg(tmp_path / "reference", checkpoint_every=5))
    assert_same_sae(resumed, reference)


def test_signal_handlers_are_restored_after_training(tmp_path):
    def mine(signum, frame): pass
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGTERM, mine)
    try:
        train_sae(data(), CFG, run_cfg(tmp_path / "run"))
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT] and signal.getsignal(signal.SIGHUP) is before[signal.SIGHUP]
    finally: signal.signal(signal.SIGTERM, before[signal.SIGTERM])


def test_an_in_process_sigterm_raises_training_interrupted_naming_it(tmp_path):
    class Terminating:
        def __iter__(self):
            for i, b in enumerate(data()):
                if i == 4: os.kill(os.getpid(), signal.SIGTERM)
                yield b
    with pytest.raises(TrainingInterrupted) as e: train_sae(Terminating(), CFG, run_cfg(tmp_path / "run"))
    assert isinstance(e.value, KeyboardInterrupt) and e.value.signal == "SIGTERM" and "after step 5 (SIGTERM)" in str(e.value)
    assert latest_checkpoint(tmp_path / "run").name == "step_5"


# ---------------------------------------------------------------------------------------------------------------
# 9. A run that stopped before its first checkpoint can be started again in its folder
# ---------------------------------------------------------------------------------------------------------------
def test_sigkill_before_the_first_checkpoint_leaves_a_restartable_folder(tmp_path, capsys):
    out = tmp_path / "run"
    child = Child(tmp_path, out, block_at=7)
    child.wait_blocked()
    os.kill(child.proc.pid, signal.SIGKILL)
    child.finish()
    debris = out / "checkpoints" / ".step_8.k1ll3d.tmp"  # as a kill in the middle of the first checkpoint leaves it
    debris.mkdir(parents=True); (debris / "trainer_state.json").write_text("{torn")
    assert (out / "history.json").exists() and (out / LOCK_NAME).exists() and latest_checkpoint(out) is None
    assert run_folder_state(out) == "unfinished"
    reference, _ = train_sae(data(), CFG, run_cfg(tmp_path / "reference"))
    fresh_copy = tmp_path / "fresh"
    shutil.copytree(out, fresh_copy)
    # resume=True (what a scheduler's restart passes): no checkpoint, so it starts from step 0 and says so
    sae, history = train_sae(data(), CFG, run_cfg(out, resume=True))
    assert "holds no checkpoint (the run stopped before its first one): training starts from step 0" in capsys.readouterr().out
    assert_same_sae(sae, reference) and history["step"][0] == 2
    # resume=False: starts there as well (the lock of the killed process died with it)
    sae, _ = train_sae(data(), CFG, run_cfg(fresh_copy))
    assert_same_sae(sae, reference)


def test_a_run_that_diverged_before_its_first_checkpoint_can_be_rerun_or_resumed(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SaeNbError, match="loss became NaN or inf"): train_sae(data(), CFG, run_cfg(out, lr=1e30, steps=4))
    assert run_folder_state(out) in ("empty", "unfinished")
    train_sae(data(), CFG, run_cfg(out, resume=True))  # before: "holds no checkpoint: run once with resume=False"
    assert latest_checkpoint(out).name == f"step_{STEPS}"


def test_folders_with_work_in_them_are_not_restarted(tmp_path):
    out = tmp_path / "run"
    train_sae(data(), CFG, run_cfg(out))
    assert run_folder_state(out) == "checkpointed"
    (out / "checkpoints" / "latest").unlink()  # whole checkpoints, but no pointer
    with pytest.raises(SaeNbError, match=r"holds checkpoint folders \(step_20\) but no .*latest: write"): train_sae(data(), CFG, run_cfg(out, resume=True))
    shutil.rmtree(out / "checkpoints")  # a finished SAE only
    assert run_folder_state(out) == "other"
    with pytest.raises(SaeNbError, match="holds a trained SAE"): train_sae(data(), CFG, run_cfg(out))
    with pytest.raises(SaeNbError, match="does not exist"): train_sae(data(), CFG, run_cfg(tmp_path / "typo", resume=True))


# ---------------------------------------------------------------------------------------------------------------
# 13. Checkpoint files swapped between runs; 14. a damaged data position
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def two_runs(tmp_path):
    "Two runs of the same shape (seeds 0 and 1), each checkpointed at step 10 of 20."
    runs = []
    for seed in (0, 1):
        out = tmp_path / f"run{seed}"
        with pytest.raises(KeyboardInterrupt):
            train_sae(InterruptingBatches(data(), 10, "raise"), CFG, run_cfg(out, seed=seed, checkpoint_every=10))
        runs.append(out)
    return runs


@pytest.mark.parametrize("files, problem", [
    (("cfg.json", "sae_weights.safetensors"), "cfg.json + sae_weights.safetensors are not the weights trainer_state.json was written with"),
    (("trainer_state.safetensors",), "trainer_state.safetensors was not written with this trainer_state.json"),
    (("trainer_state.json",), "trainer_state.safetensors was not written with this trainer_state.json")])
def test_checkpoint_files_from_another_run_are_refused(two_runs, files, problem):
    a, b = (latest_checkpoint(r) for r in two_runs)
    assert a.name == b.name == "step_10"
    for name in files: shutil.copy2(b / name, a / name)
    with pytest.raises(SaeNbError, match="damaged") as e: train_sae(data(), CFG, run_cfg(two_runs[0], seed=0, checkpoint_every=10, resume=True))
    assert problem in str(e.value), str(e.value)


def test_the_intact_checkpoint_still_resumes(two_runs, tmp_path):
    resumed, _ = train_sae(data(), CFG, run_cfg(two_runs[0], seed=0, checkpoint_every=10, resume=True))
    reference, _ = train_sae(data(), CFG, run_cfg(tmp_path / "reference", checkpoint_every=10))
    assert_same_sae(resumed, reference)


class CountingBatches(list):
    "A list of batches that fails the test if it is iterated absurdly far (a replay that would run for ever)."
    pulled = 0
    def __iter__(self):
        for b in list.__iter__(self):
            CountingBatches.pulled += 1
            assert CountingBatches.pulled < 10_000, "resume replayed the data for ever"
            yield b


def _edit_data_state(folder, **changes):
    state = read_json(folder / "trainer_state.json")
    state["data_state"][0].update(changes)
    write_json_atomic(state, folder / "trainer_state.json")


def test_an_absurd_data_position_is_a_damaged_checkpoint_not_an_endless_replay(two_runs):
    _edit_data_state(latest_checkpoint(two_runs[0]), consumed=1_280_000_000_000)
    CountingBatches.pulled = 0
    with pytest.raises(SaeNbError, match=r"has a data position of 1280000000000 batches, but a run at step 10 has drawn at most 11.*damaged"):
        train_sae(CountingBatches(data()), CFG, run_cfg(two_runs[0], checkpoint_every=10, resume=True))


def test_an_absurd_tensor_data_epoch_is_refused(tmp_path):
    x, out = make_data(1024), tmp_path / "run"
    train_sae(x, CFG, run_cfg(out, checkpoint_every=10, steps=12))
    folder = latest_checkpoint(out)
    _edit_data_state(folder, epoch=10**9)
    with pytest.raises(SaeNbError, match="has a data position of .* batches .epoch, index."):
        train_sae(x, CFG, run_cfg(out, checkpoint_every=10, steps=12, resume=True))


def test_an_absurd_rows_yielded_of_an_activation_store_is_refused(tmp_path, monkeypatch):
    from test_reliability import HOOK
    from sae_nb.activations import ActivationStore
    from sae_nb.data import load_corpus, tokenize_corpus
    from sae_nb.models import load_model
    model = load_model("glassllm-en", device="cpu")
    tokens = tokenize_corpus(load_corpus("pydoc"), model, context_size=16, max_tokens=16 * 24, show_progress=False)
    def store(): return ActivationStore(model, tokens, HOOK, batch_size=32, show_progress=False, model_batch_size=8, seed=0)
    cfg, out = SAEConfig(architecture="standard", d_in=store().d_in, d_sae=64), tmp_path / "run"
    train_sae(store(), cfg, run_cfg(out, steps=6, checkpoint_every=3))
    folder = latest_checkpoint(out)
    state = read_json(folder / "trainer_state.json")
    state["data_state"][0]["state"]["rows_yielded"] = 1_280_000_000_000
    write_json_atomic(state, folder / "trainer_state.json")
    calls = [0]
    real_step = ActivationStore._step
    def counting(self, *a, **kw):
        calls[0] += 1
        assert calls[0] < 100_000, "the store replayed for ever"
        return real_step(self, *a, **kw)
    monkeypatch.setattr(ActivationStore, "_step", counting)
    with pytest.raises(SaeNbError, match=r"rows_yielded.*at most 224.*damaged"):
        train_sae(store(), cfg, run_cfg(out, steps=6, checkpoint_every=3, resume=True))


# ---------------------------------------------------------------------------------------------------------------
# 6. normalize_activations="expected_average_only_in" is applied; 23. extreme scales are flagged
# ---------------------------------------------------------------------------------------------------------------
TINY = 1e-6


def test_normalize_activations_trains_at_unit_scale_and_saves_an_sae_for_raw_activations(tmp_path):
    x = make_data(1024) * TINY
    cfg = SAEConfig(architecture="standard", d_in=16, d_sae=48, normalize_activations="expected_average_only_in")
    out = tmp_path / "run"
    sae, history = train_sae(x, cfg, run_cfg(out, l1_coefficient=0.05, steps=40, log_every=10))
    assert history["explained_variance"][-1] > 0.6 and history["l0"][-1] > 0.5, history  # before: EV -5.8e4, L0 0
    assert sae.cfg.normalize_activations == "none"
    with torch.no_grad():
        err = (sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert 1 - float(err) > 0.6  # the returned SAE reads raw activations
    assert_same_sae(SAE.load(out / "sae"), sae)
    state = read_json(latest_checkpoint(out) / "trainer_state.json")
    first = batch_of_step_one(x, 32)
    assert math.isclose(state["activation_scale"], math.sqrt(16) / float(first.double().norm(dim=-1).mean()), rel_tol=1e-9)


def batch_of_step_one(x, batch_size, seed=0):
    from sae_nb.train import _epoch_permutation
    return x[_epoch_permutation(len(x), seed, 0)[:batch_size]]


def test_normalized_training_resumes_exactly(tmp_path):
    x = make_data(1024) * 1e3
    cfg = SAEConfig(architecture="topk", d_in=16, d_sae=48, k=4, normalize_activations="expected_average_only_in")
    reference, _ = train_sae(x, cfg, run_cfg(tmp_path / "reference", checkpoint_every=5))
    sae = SAE.from_config(cfg, generator=torch.Generator().manual_seed(0))
    count, after = [0], sae.on_after_optimizer_step
    def hooked():
        after(); count[0] += 1
        if count[0] == 7: os.kill(os.getpid(), signal.SIGINT)
    sae.on_after_optimizer_step = hooked
    with pytest.raises(KeyboardInterrupt): train_sae(x, sae, run_cfg(tmp_path / "cut", checkpoint_every=5))
    assert latest_checkpoint(tmp_path / "cut").name == "step_7"
    resumed, _ = train_sae(x, cfg, run_cfg(tmp_path / "cut", checkpoint_every=5, resume=True))
    assert_same_sae(resumed, reference)


def test_activations_of_extreme_scale_are_flagged(tmp_path):
    with pytest.warns(UserWarning, match="scale is extreme.*normalize_activations='expected_average_only_in'"):
        train_sae(make_data(1024) * TINY, CFG, run_cfg(steps=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_sae(make_data(1024), CFG, run_cfg(steps=2))  # order-1 activations: no warning


# ---------------------------------------------------------------------------------------------------------------
# Moved from nbs/05_train.ipynb (issue #11: no kill or damaged-file tests in the middle of the lesson)
# ---------------------------------------------------------------------------------------------------------------
class Killed(BaseException):
    "A simulated kill: a BaseException, so no `except Exception` in the code under test can swallow it."


def kill_at_every_rename(tmp_path, save):
    "For each of the first 8 os.replace/os.rename calls of `save(new_sae, folder)` over a folder holding the old SAE: kill there, load the folder; the d_sae loaded each time."
    from sae_nb.train import _save_sae_folder
    old_sae, new_sae = (SAE.from_config(SAEConfig(architecture="standard", d_in=8, d_sae=n), generator=torch.Generator().manual_seed(n)) for n in (16, 24))
    real_replace, real_rename, outcomes = os.replace, os.rename, []
    for kill_at in range(1, 9):
        folder = tmp_path / f"kill_{kill_at}" / "sae"
        _save_sae_folder(old_sae, folder)
        calls = [0]
        def killing(real):
            def call(*a, **kw):
                calls[0] += 1
                if calls[0] == kill_at: raise Killed
                return real(*a, **kw)
            return call
        os.replace, os.rename = killing(real_replace), killing(real_rename)
        try: save(new_sae, folder)
        except Killed: pass
        finally: os.replace, os.rename = real_replace, real_rename
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a kill between the two files: load says so, and uses the weights' own config
            loaded = SAE.load(folder)
        outcomes.append(loaded.cfg.d_sae)
        assert_same_sae(loaded, new_sae if loaded.cfg.d_sae == 24 else old_sae)
    return outcomes


def test_a_kill_during_the_final_sae_replacement_leaves_the_old_or_the_new_sae(tmp_path):
    "The final SAE replaces an earlier one: a kill before any rename of the save leaves a folder that loads as the old SAE or the new one."
    from sae_nb.train import _save_sae_folder
    outcomes = kill_at_every_rename(tmp_path, _save_sae_folder)
    assert set(outcomes) == {16, 24} and outcomes[-1] == 24, outcomes  # some kills land before the swap, and the save gets through


def test_the_kill_check_fails_for_a_save_that_deletes_the_old_sae_first(tmp_path):
    "The check above can fail: a save that removes the old folder and then writes the new one leaves nothing to load after a kill."
    def delete_then_save(sae, folder):
        shutil.rmtree(folder)
        return sae.save(folder)
    with pytest.raises((SaeNbError, FileNotFoundError, AssertionError)): kill_at_every_rename(tmp_path, delete_then_save)


@pytest.fixture
def checkpointed_run(tmp_path):
    "A finished 30-step run with checkpoints step_20 and step_30 (the notebook's `standard_straight`)."
    out = tmp_path / "run"
    train_sae(data(), CFG, run_cfg(out, steps=30, checkpoint_every=10))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_20", "step_30"]
    return out


def _drop_step(ck):
    state = read_json(ck / "trainer_state.json"); del state["step"]
    write_json_atomic(state, ck / "trainer_state.json")


def _wrong_adam_shape(ck):
    t = load_safetensors_checked(ck / "trainer_state.safetensors"); t["optimizer.W_enc.exp_avg"] = torch.zeros(3)
    save_safetensors_atomic(t, ck / "trainer_state.safetensors")


def _wrong_rng(ck):
    state = read_json(ck / "trainer_state.json"); state["rng"]["python"] = [3, [1, 2], None]
    write_json_atomic(state, ck / "trainer_state.json")


@pytest.mark.parametrize("edit, problem", [
    (_drop_step, "trainer_state.json has no 'step'"),
    (_wrong_rng, "trainer_state.json has an unusable 'rng' state"),
    (_wrong_adam_shape, "trainer_state.safetensors has 'optimizer.W_enc.exp_avg' of float32 (3,), expected floating point (16, 48)")])
def test_a_damaged_checkpoint_is_refused_before_anything_is_restored(checkpointed_run, edit, problem):
    "Refused with the file, the problem and the way back to the previous checkpoint; the SAE passed in is untouched."
    ck = latest_checkpoint(checkpointed_run)
    edit(ck)
    sae = SAE.from_config(CFG, generator=torch.Generator().manual_seed(0))
    before = {n: getattr(sae, n).clone() for n in sae.tensor_names}
    with pytest.raises(SaeNbError) as e: train_sae(data(), sae, run_cfg(checkpointed_run, steps=30, checkpoint_every=10, resume=True))
    msg = str(e.value)
    assert msg.startswith(f"Cannot resume from {ck}: {problem}"), msg
    assert f"delete {ck} and write step_20 into {ck.parent / 'latest'}" in msg, msg
    assert all(torch.equal(getattr(sae, n), t) for n, t in before.items())


def test_latest_may_only_name_a_checkpoint_folder_of_the_run(checkpointed_run):
    (checkpointed_run / "checkpoints" / "latest").write_text("../../other_run/checkpoints/step_30\n")
    with pytest.raises(SaeNbError, match=r"not a checkpoint folder of this run \(step_<number>"): latest_checkpoint(checkpointed_run)
    with pytest.raises(SaeNbError, match=re.escape(str(checkpointed_run / "checkpoints" / "latest"))):
        train_sae(data(), CFG, run_cfg(checkpointed_run, steps=30, resume=True))
