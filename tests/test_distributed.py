"""Data-parallel training (`sae_nb.train` on torch.distributed) matches one process: 2 gloo ranks on the CPU via torchrun.

One torchrun launch (2 processes) trains a few configurations; this process then trains the same ones alone and
compares. Under a minute on 2 CPU cores.
"""
import os, subprocess, sys, warnings
from pathlib import Path

import pytest
import torch

from sae_nb.config import LOCK_NAME, SaeNbError, read_json
from sae_nb.sae import SAE, SAEConfig
from sae_nb.train import TrainConfig, train_sae
from synthetic import sparse_activations

HERE = Path(__file__).resolve().parent


def make_data(n_rows=1024, d_in=16, seed=0):
    "The runs' data: 32 directions, each active with p 0.1 (the same on every rank)."
    return sparse_activations(n_rows, d_in, n_features=32, p_active=0.1, seed=seed)


def runs():
    "name -> (SAE config, train settings without out_dir) of the runs compared."
    common = dict(batch_size=64, steps=12, lr=1e-2, l1_coefficient=0.05, log_every=4, lr_warmup_steps=2,
                  show_progress=False, device="cpu", checkpoint_every=6)
    return {
        "standard": (SAEConfig(architecture="standard", d_in=16, d_sae=48), dict(common)),
        # a 2-batch dead window: AuxK is on from step 3, so the all-reduced firing counters matter
        "topk": (SAEConfig(architecture="topk", d_in=16, d_sae=48, k=3), dict(common, dead_feature_window=128)),
    }


class ShardedBatches:
    "A stand-in for a sharded ActivationStore: per-rank local batches, a different number on each rank."
    def __init__(self, rank, world_size, batch_size, n_batches):
        self.rank, self.world_size, self.batch_size, self.d_in = rank, world_size, batch_size, 16
        self.data = make_data(seed=10 + rank)[: batch_size * n_batches]
        self.position = 0
    def __iter__(self): return self
    def __next__(self):
        if self.position * self.batch_size >= len(self.data): raise StopIteration
        self.position += 1
        return self.data[(self.position - 1) * self.batch_size: self.position * self.batch_size]
    def state_dict(self): return {"position": self.position}
    def load_state_dict(self, state): self.position = state["position"]


SCRIPT = """
import os, sys, warnings
import torch
sys.path.insert(0, sys.argv[2])
from test_distributed import make_data, runs, ShardedBatches
from sae_nb.train import TrainConfig, train_sae
out = sys.argv[1]
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
for name, (cfg, settings) in runs().items():
    train_sae(make_data(), cfg, TrainConfig(**settings, out_dir=f"{out}/{name}"))
# uneven shards: rank 0 has 5 local batches, rank 1 has 7 -> both stop after 5 steps, nothing hangs
cfg, settings = runs()["standard"]
store = ShardedBatches(rank, world, 32, 5 + 2 * rank)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    sae, history = train_sae(store, cfg, TrainConfig(**{**settings, "b_dec_init": None}, out_dir=f"{out}/sharded"))
assert history["step"][-1] == 5, history["step"]
print(f"rank {rank} done", flush=True)
"""


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    script = out / "ddp_train.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(out), str(HERE)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"torchrun failed:\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"
    assert "rank 0 done" in r.stdout and "rank 1 done" in r.stdout
    return out


@pytest.mark.parametrize("name", list(runs()))
def test_two_ranks_match_one_process(ddp_runs, name):
    torch.set_num_threads(1)
    cfg, settings = runs()[name]
    single, history = train_sae(make_data(), cfg, TrainConfig(**{**settings, "checkpoint_every": None}))
    parallel = SAE.load(ddp_runs / name / "sae")
    for key, value in single.state_dict().items():
        torch.testing.assert_close(parallel.state_dict()[key], value, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name} {key}: {m}")
    logged = read_json(ddp_runs / name / "history.json")
    assert logged["step"] == history["step"] and logged["tokens"] == history["tokens"]
    for key in ("loss", "mse", "l0", "dead_fraction", "explained_variance", "lr"):
        torch.testing.assert_close(torch.tensor(logged[key]), torch.tensor(history[key]), atol=1e-4, rtol=1e-4)
    state = read_json(ddp_runs / name / "checkpoints" / "step_12" / "trainer_state.json")
    assert state["world_size"] == 2 and state["data_sharded"] is False


def test_rank0_alone_writes(ddp_runs):
    names = sorted(p.name for p in (ddp_runs / "standard").iterdir() if p.name != LOCK_NAME)
    assert names == ["checkpoints", "history.json", "sae"]
    assert sorted(p.name for p in (ddp_runs / "standard" / "checkpoints").iterdir()) == ["latest", "step_12", "step_6"]


def test_resume_with_another_world_size(ddp_runs, tmp_path):
    torch.set_num_threads(1)
    import shutil
    # tensor data: the global batches do not depend on the world size, so one process may go on (with a warning)
    run = tmp_path / "standard"
    shutil.copytree(ddp_runs / "standard", run)
    (run / "checkpoints" / "latest").write_text("step_6\n")  # go on from the middle (a run's length is fixed: no extending)
    cfg, settings = runs()["standard"]
    with pytest.warns(UserWarning, match="world size 2 on 1"):
        sae, history = train_sae(make_data(), cfg, TrainConfig(**settings, out_dir=run, resume=True))
    assert history["step"][-1] == settings["steps"] == 12
    # a sharded store's positions are per rank: resuming on another world size is refused with the fix
    sharded = ddp_runs / "sharded"
    assert read_json(sharded / "checkpoints" / "step_5" / "trainer_state.json")["data_sharded"] is True
    with pytest.raises(SaeNbError, match="torchrun --nproc_per_node 2"):
        train_sae(ShardedBatches(0, 1, 64, 8), cfg, TrainConfig(**{**settings, "b_dec_init": None}, out_dir=sharded, resume=True))


def test_main_job_under_torchrun(tmp_path):
    "`torchrun --nproc_per_node 2 -m sae_nb.cli train ...` trains data-parallel; rank 0 alone evaluates and writes."
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    env.pop("WORLD_SIZE", None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "sae_nb.cli", "train", "--model", "glassllm-en", "--context-size", "64", "--architecture", "topk",
                        "--k", "8", "--expansion", "1", "--steps", "8", "--batch-size", "128", "--eval-windows", "2",
                        "--checkpoint-every", "4", "--no-report", "--device", "cpu", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"torchrun failed:\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"
    assert r.stdout.count("SAE saved to") == 1          # one report, from rank 0
    state = read_json(out / "checkpoints" / "step_8" / "trainer_state.json")
    assert state["world_size"] == 2 and state["data_sharded"] is True
    metrics = read_json(out / "metrics.json")
    assert metrics["steps"] == 8 and 0 < metrics["l0"] <= 8
    assert SAE.load(out / "sae").cfg.d_sae == 341


CRASH_SCRIPT = """
import os, sys, time
sys.path.insert(0, sys.argv[2])
from test_distributed import make_data, runs
from sae_nb.train import TrainConfig, train_sae
rank = int(os.environ["RANK"])
cfg, settings = runs()["standard"]
train_sae(make_data(), cfg, TrainConfig(**{**settings, "steps": 4, "checkpoint_every": None}, out_dir=sys.argv[1]))
print(f"rank {rank} trained", flush=True)
if rank == 1: raise RuntimeError("rank 1 fails after training")
time.sleep(300)  # rank 0 is busy long after rank 1 leaves: torchrun stops it once rank 1 has failed
"""


def test_a_rank_crashing_at_exit_reports_its_own_error(tmp_path):
    "A rank that raises after training leaves at once with its error: no wait at the exit barrier (60 s), no abort in gloo."
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path / "run"), str(HERE)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try: out, _ = p.communicate(timeout=50)
    except subprocess.TimeoutExpired:
        p.terminate()  # torchrun's agent stops its workers on SIGTERM (they run in sessions of their own)
        p.communicate(timeout=60)
        pytest.fail("torchrun still running after 50 s: the crashed rank waited for the others at exit")
    assert p.returncode != 0 and "rank 0 trained" in out and "rank 1 trained" in out, out[-6000:]
    assert "RuntimeError: rank 1 fails after training" in out, out[-6000:]
    assert "exitcode  : 1 " in out and "SIGABRT" not in out and "terminate called" not in out, out[-6000:]
