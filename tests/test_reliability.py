"""Reliability of long SAE runs: they survive being stopped, lose no work, and never run code from a file they load.

Sections: interruption (SIGKILL + resume, Ctrl-C), atomic writes under kills, untrusted files (static no-pickle check,
corrupt folders/caches/checkpoints, a hypothesis fuzz), bad input, numerical health. What each test injects and what
it found is in the table in tests/README.md. Run: `make test`, or `.venv/bin/python -m pytest tests/test_reliability.py`.
Killed jobs are forked from one child (`sys.executable`, torch imported once, one thread), so each kill costs
milliseconds and runs in different processes compare bit for bit on the CPU.
"""
import ast, io, json, os, random, shutil, signal, struct, subprocess, sys, tempfile, time, tokenize, warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st

from sae_nb import train as train_module
from sae_nb.config import SaeNbError, get_device, load_safetensors_checked, read_json, save_safetensors_atomic
from sae_nb.sae import ARCHITECTURES, DTYPES, SAE, SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SAEConfig
from sae_nb.train import HISTORY_KEYS, TrainConfig, latest_checkpoint, train_sae
from synthetic import sparse_activations

ROOT = Path(__file__).resolve().parents[1]
HOOK = "blocks.0.mlp.hook_post"  # glassllm-en: 341 wide
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE",
                 HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")


def make_data(n_rows=1024, d_in=16, seed=0):
    "SAE-shaped synthetic activations: 64 directions, each active with p 0.08."
    return sparse_activations(n_rows, d_in, n_features=64, p_active=0.08, seed=seed)


def batches_of(data, batch_size):
    "A re-iterable list of consecutive batches (the trainer resumes it by skipping the batches already used)."
    return [data[i:i + batch_size] for i in range(0, len(data) - batch_size + 1, batch_size)]


def assert_same_sae(a, b):
    "Same class, same config, every tensor bit for bit."
    assert type(a) is type(b) and a.cfg == b.cfg
    for n in a.tensor_names:
        ta, tb = getattr(a, n), getattr(b, n)
        assert ta.dtype == tb.dtype and torch.equal(ta, tb), f"tensor {n} differs"


def load_quietly(folder):
    "SAE.load without the warning it gives for a folder whose overwrite was interrupted."
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SAE.load(folder)


def tiny_train_cfg(**kw):
    return TrainConfig(**{**dict(batch_size=32, steps=12, lr=1e-2, l1_coefficient=0.05, lr_warmup_steps=2, log_every=4,
                                 show_progress=False, device="cpu", seed=0), **kw})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    "Tiny tensors: one thread is fastest, and idle OpenMP threads spinning on shared cores slow everything down."
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def glass():
    "glassllm-en (852K parameters) and 48 windows of 16 tokens of the embedded corpus; loaded once."
    from sae_nb.data import load_corpus, tokenize_corpus
    from sae_nb.models import load_model
    model = load_model("glassllm-en", device="cpu")
    tokens = tokenize_corpus(load_corpus("pydoc"), model, context_size=16, max_tokens=16 * 48, show_progress=False)
    return model, tokens


# ---------------------------------------------------------------------------------------------------------------
# Interruption: SIGKILL part-way, resume, compare bit for bit with an uninterrupted run
# ---------------------------------------------------------------------------------------------------------------
def _checkpoint_step(out):
    folder = latest_checkpoint(out)  # must never raise while a run is being killed and resumed
    return None if folder is None else int(folder.name.split("_")[1])


def _kill_after_checkpoint(server, pid, out, after_step, rng, timeout=120):
    "SIGKILL `pid` at a random moment after it wrote a checkpoint later than `after_step`; returns the checkpoint step then."
    deadline = time.monotonic() + timeout
    while True:
        step = _checkpoint_step(out)
        if step is not None and step > after_step: break
        assert not (out / "sae").exists(), "the run ended before it could be killed"
        assert time.monotonic() < deadline, f"no checkpoint appeared in time: {server.log()}"
        time.sleep(0.005)
    time.sleep(rng.uniform(0, 0.12))  # lands anywhere: mid-step, mid-checkpoint, mid-history write
    os.kill(pid, signal.SIGKILL)
    assert server.wait(pid) == -signal.SIGKILL, "the run was not killed part-way"
    return _checkpoint_step(out)


def test_sigkill_twice_then_resume_equals_uninterrupted_run_bit_for_bit(tmp_path, fork_server):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    reference = fork_server.start("train", ref, "fresh", 0)  # runs alongside the interrupted one
    rng = random.Random(0)
    first = _kill_after_checkpoint(fork_server, fork_server.start("train", cut, "fresh", 0.02), cut, 0, rng)
    second = _kill_after_checkpoint(fork_server, fork_server.start("train", cut, "resume", 0.02), cut, first, rng)
    assert 0 < first < second < 48 and not (cut / "sae").exists()
    assert fork_server.wait(fork_server.start("train", cut, "resume", 0)) == 0, fork_server.log()
    assert fork_server.wait(reference) == 0, fork_server.log()
    assert_same_sae(SAE.load(cut / "sae"), SAE.load(ref / "sae"))
    h_cut, h_ref = read_json(cut / "history.json"), read_json(ref / "history.json")
    for k in HISTORY_KEYS:
        if k != "elapsed_s": assert h_cut[k] == h_ref[k], k  # the logged metrics too, exactly
    assert h_ref["step"][-1] == 48 and _checkpoint_step(cut) == 48


# ---------------------------------------------------------------------------------------------------------------
# Interruption: Ctrl-C in a notebook
# ---------------------------------------------------------------------------------------------------------------
class InterruptingBatches:
    "Re-iterable batches; on the first pass, interrupts before yielding batch `at` (0-based): SIGINT or a raise."
    def __init__(self, batches, at, how):
        self.batches, self.at, self.how, self.fired = batches, at, how, False
    def __iter__(self):
        for i, b in enumerate(self.batches):
            if i == self.at and not self.fired:
                self.fired = True
                if self.how == "sigint": os.kill(os.getpid(), signal.SIGINT)  # what a notebook's interrupt button sends
                else: raise KeyboardInterrupt("interrupted inside the data iterator")
            yield b


def _interrupt_then_resume(tmp_path, how, at=7):
    data = batches_of(make_data(512), 32)
    cfg, kw = SAEConfig(architecture="topk", d_in=16, d_sae=48, k=4), dict(steps=14, dead_feature_window=64)
    ref, _ = train_sae(data, cfg, tiny_train_cfg(**kw))
    out, kw = tmp_path / how, dict(kw, checkpoint_every=5)
    with pytest.raises(KeyboardInterrupt):
        train_sae(InterruptingBatches(data, at, how), cfg, tiny_train_cfg(out_dir=out, **kw))
    return ref, out, data, cfg, kw


def test_ctrl_c_signal_checkpoints_the_step_in_flight_and_resumes_exactly(tmp_path):
    ref, out, data, cfg, kw = _interrupt_then_resume(tmp_path, "sigint")
    # the SIGINT arrives while batch 8 is fetched: step 8 finishes, is checkpointed, then KeyboardInterrupt is raised
    assert latest_checkpoint(out).name == "step_8" and not (out / "sae").exists()
    resumed, _ = train_sae(data, cfg, tiny_train_cfg(out_dir=out, resume=True, **kw))
    assert_same_sae(resumed, ref)


def test_keyboardinterrupt_from_the_data_iterator_checkpoints_the_last_completed_step(tmp_path):
    ref, out, data, cfg, kw = _interrupt_then_resume(tmp_path, "raise")
    assert latest_checkpoint(out).name == "step_7"  # 7 steps completed before batch 8 was asked for
    resumed, _ = train_sae(data, cfg, tiny_train_cfg(out_dir=out, resume=True, **kw))
    assert_same_sae(resumed, ref)


# ---------------------------------------------------------------------------------------------------------------
# Atomic writes: two versions of everything we write
# ---------------------------------------------------------------------------------------------------------------
CHILD_SRC = r'''
_VERSIONS = []

def versions():
    "Two versions of every kind of file: different shapes, values and metadata, so a mix of them is detectable."
    import torch
    from sae_nb.sae import SAE, SAEConfig
    if _VERSIONS: return _VERSIONS
    out = _VERSIONS
    for i, (arch, d_sae, k) in enumerate([("standard", 32, None), ("topk", 48, 5)]):
        sae = SAE.from_config(SAEConfig(architecture=arch, d_in=16, d_sae=d_sae, k=k, hook_name=f"blocks.{i}.mlp.hook_post"),
                              generator=torch.Generator().manual_seed(i))
        with torch.no_grad(): sae.b_enc.fill_(0.1 * (i + 1)); sae.b_dec.fill_(-0.2 * (i + 1))
        marker = torch.full((3 + i,), float(i))
        out.append(dict(sae=sae, json={"version": i, "values": list(range(10 * (i + 1)))},
                        tensors={"activations": torch.arange(40.0 * (i + 1)).reshape(-1, 4) + i, "marker": marker},
                        text=f"<html>report {i} " + "x" * (5000 * (i + 1)) + "</html>"))
    return out

def write_checkpoint(out, step, v, i):
    "A checkpoint as train_sae writes one (folder renamed into place, then the `latest` pointer, then history.json)."
    from sae_nb.train import _write_checkpoint
    from sae_nb.config import write_json_atomic
    _write_checkpoint(out, step, v["sae"], {"step": step, "version": i, **v["json"]}, {"marker": v["tensors"]["marker"]}, 2)
    write_json_atomic(v["json"], out / "history.json")

def write_files(root, v):
    "A JSON file (history/metrics), a safetensors file (cache shard) and a text file (report), each atomically."
    from pathlib import Path
    from sae_nb.config import atomic_path, save_safetensors_atomic, write_json_atomic
    write_json_atomic(v["json"], root / "history.json")
    save_safetensors_atomic(v["tensors"], root / "shard_00000.safetensors", metadata={"format": "test"})
    with atomic_path(root / "report.html") as tmp: Path(tmp).write_text(v["text"])

def train_job(out, mode, pause):
    "The seeded run the SIGKILL test interrupts: tensor data, resampling, checkpoints every 4 of 48 steps."
    import time, torch
    from sae_nb.sae import SAE, SAEConfig
    from sae_nb.train import TrainConfig, train_sae
    if float(pause):  # slow every step down so the parent can kill the run part-way; the numbers are untouched
        after = SAE.on_after_optimizer_step
        def slow(self): time.sleep(float(pause)); return after(self)
        SAE.on_after_optimizer_step = slow
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(64, 16, generator=g); directions /= directions.norm(dim=1, keepdim=True)
    coef = (torch.rand(1024, 64, generator=g) < 0.08) * torch.rand(1024, 64, generator=g) * 3
    tc = TrainConfig(batch_size=32, steps=48, lr=1e-2, l1_coefficient=0.05, lr_warmup_steps=4, log_every=5,
                     checkpoint_every=4, keep_checkpoints=2, resample_every=16, dead_feature_window=96, seed=3,
                     show_progress=False, device="cpu", out_dir=out, resume=(mode == "resume"))
    train_sae(coef @ directions + 0.5, SAEConfig(architecture="standard", d_in=16, d_sae=48), tc)

def save_loop(mode, root, first):
    "Save the same things over and over, alternating the two versions, until killed."
    from pathlib import Path
    from sae_nb.train import latest_checkpoint
    root, i, V = Path(root), int(first), versions()
    while True:
        if mode == "sae": V[i % 2]["sae"].save(root / "sae", overwrite=True)
        elif mode == "checkpoint":
            step = int(latest_checkpoint(root).name.split("_")[1]) + 1  # as a resumed run does
            write_checkpoint(root, step, V[step % 2], step % 2)
        else: write_files(root, V[i % 2])
        i += 1
'''
exec(CHILD_SRC)
V = versions()  # noqa: F821 (CHILD_SRC defines it, here and in the fork server's children)


def check_sae_folder(folder):
    "The folder loads as exactly one of the two versions; returns which."
    got = load_quietly(folder)
    i = [v["sae"].cfg.d_sae for v in V].index(got.cfg.d_sae)
    assert_same_sae(got, V[i]["sae"])
    return i


def check_checkpoints(out):
    "`latest` names a complete checkpoint whose SAE and trainer state are the same version; history.json is whole."
    folder = latest_checkpoint(out)
    step = int(folder.name.split("_")[1])
    state = read_json(folder / "trainer_state.json")
    i = state["version"]
    assert state["step"] == step and i == step % 2
    assert_same_sae(load_quietly(folder), V[i]["sae"])
    assert torch.equal(load_safetensors_checked(folder / "trainer_state.safetensors")["marker"], V[i]["tensors"]["marker"])
    assert read_json(out / "history.json") in (V[0]["json"], V[1]["json"])
    return i


def check_files(root):
    i = [v["json"] for v in V].index(read_json(root / "history.json"))
    shard = load_safetensors_checked(root / "shard_00000.safetensors")
    assert any(set(shard) == set(v["tensors"]) and all(torch.equal(shard[k], v["tensors"][k]) for k in shard) for v in V)
    assert (root / "report.html").read_text() in (V[0]["text"], V[1]["text"])
    return i


class Crash(BaseException):
    "A simulated kill: a BaseException, so no `except Exception`/`except OSError` in the code under test can swallow it."


def run_with_crash(monkeypatch, fn, crash_at=None, after=False):
    "Run `fn`, crashing just before (or after) its `crash_at`-th rename/replace/rmtree; returns how many there were."
    calls = [0]
    def wrap(real):
        def call(*a, **kw):
            calls[0] += 1
            if calls[0] == crash_at and not after: raise Crash
            try: result = real(*a, **kw)
            except BaseException:  # a call that failed (SAE.save's rename onto a full folder): a kill after it = before it
                if calls[0] == crash_at: raise Crash
                raise
            if calls[0] == crash_at and after: raise Crash
            return result
        return call
    with monkeypatch.context() as m:
        for mod, name in ((os, "replace"), (os, "rename"), (shutil, "rmtree")): m.setattr(mod, name, wrap(getattr(mod, name)))
        try: fn()
        except Crash: assert crash_at is not None
        else: assert crash_at is None, "the crash point was never reached"
    return calls[0]


def crash_everywhere(monkeypatch, tmp_path, setup, write, check, expect_new):
    "For every rename point of `write`, before and after it: fresh old state, crash there, `check` sees old or new."
    n = None
    for k in [None] + list(range(1, 64)):
        for after in ((False,) if k is None else (False, True)):
            root = Path(tempfile.mkdtemp(dir=tmp_path))
            setup(root)
            got = run_with_crash(monkeypatch, lambda: write(root), k, after)
            if k is None: n = got  # the dry run: how many rename points the write has
            outcome = check(root)
            if k is None: assert outcome == expect_new
            shutil.rmtree(root)
        if n is not None and k == n: break
    assert n is not None and 2 <= n < 64
    return n


def test_crash_at_every_rename_of_an_sae_folder_overwrite_leaves_old_or_new(monkeypatch, tmp_path):
    crash_everywhere(monkeypatch, tmp_path, lambda r: V[0]["sae"].save(r / "sae"),
                     lambda r: V[1]["sae"].save(r / "sae", overwrite=True), lambda r: check_sae_folder(r / "sae"), 1)


def test_crash_at_every_rename_of_a_checkpoint_leaves_old_or_new(monkeypatch, tmp_path):
    crash_everywhere(monkeypatch, tmp_path, lambda r: write_checkpoint(r, 1, V[1], 1),  # noqa: F821
                     lambda r: write_checkpoint(r, 2, V[0], 0), check_checkpoints, 0)  # noqa: F821


def test_crash_at_every_rename_of_plain_files_leaves_old_or_new(monkeypatch, tmp_path):
    crash_everywhere(monkeypatch, tmp_path, lambda r: write_files(r, V[0]), lambda r: write_files(r, V[1]),  # noqa: F821
                     check_files, 1)


def test_crash_at_every_rename_of_the_final_sae_folder_leaves_old_or_new(monkeypatch, tmp_path):
    crash_everywhere(monkeypatch, tmp_path, lambda r: train_module._save_sae_folder(V[0]["sae"], r / "sae"),
                     lambda r: train_module._save_sae_folder(V[1]["sae"], r / "sae"), lambda r: check_sae_folder(r / "sae"), 1)


def test_crash_while_overwriting_an_activation_cache_never_gives_a_mix(monkeypatch, tmp_path, glass):
    "save_cache over an existing cache: afterwards the cache is the old one, the new one, or refused with a clear error."
    from sae_nb.activations import ActivationStore
    model, tokens = glass
    stores = [ActivationStore(model, tokens[i * 8:(i + 1) * 8], HOOK, batch_size=16, shuffle=False, loop=False,
                              show_progress=False, model_batch_size=4) for i in range(2)]
    rows = [torch.cat(list(s)) for s in stores]
    for s in stores: s.reset()
    def check(root):
        try: cache = ActivationStore.from_cache(root / "cache", batch_size=16, shuffle=False, loop=False, show_progress=False)
        except SaeNbError as e:
            assert "interrupted save_cache" in str(e); return None
        got = torch.cat(list(cache))
        return [torch.equal(got, r) for r in rows].index(True)
    # shard_mb=0 is not allowed; a small cache is one shard plus metadata.json
    crash_everywhere(monkeypatch, tmp_path, lambda r: stores[0].save_cache(r / "cache"),
                     lambda r: stores[1].save_cache(r / "cache", overwrite=True), check, 1)


SERVER_SRC = r"""
import os, sys, traceback
import torch
torch.set_num_threads(1)
import sae_nb.train, sae_nb.sae  # imported once here; every job is a fork, ready in milliseconds
exec(open(sys.argv[1]).read())
versions()  # built before forking, so a writer starts writing at once
JOBS = {"train": train_job, "save": save_loop}
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "wait":
        print(os.waitstatus_to_exitcode(os.waitpid(int(args[0]), 0)[1]), flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        code = 1
        try: JOBS[cmd](*args); code = 0
        except BaseException: traceback.print_exc()
        finally: os._exit(code)
    print(pid, flush=True)
"""


class ForkServer:
    "A child process that imports torch and sae_nb once and forks jobs on request, so each job (and each kill) is cheap."
    def __init__(self, folder):
        (folder / "child.py").write_text(CHILD_SRC)
        (folder / "server.py").write_text(SERVER_SRC)
        self.log_path = folder / "server.log"
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(folder / "server.py"), str(folder / "child.py")], env=CHILD_ENV,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log_file, text=True)
    def _ask(self, line):
        self.proc.stdin.write(line + "\n"); self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer, f"the fork server died: {self.log()}"
        return int(answer)
    def start(self, job, *args): return self._ask(" ".join([job, *map(str, args)]))
    def wait(self, pid): return self._ask(f"wait {pid}")
    def log(self): return self.log_path.read_text()[-4000:]
    def close(self):
        self.proc.stdin.close(); self.proc.kill(); self.proc.wait(); self.proc.stdout.close(); self.log_file.close()


@pytest.fixture(scope="module")
def fork_server(tmp_path_factory):
    if not hasattr(os, "fork"): pytest.skip("SIGKILL tests fork their jobs (POSIX only)")
    server = ForkServer(tmp_path_factory.mktemp("fork_server"))
    yield server
    server.close()


def test_sigkill_at_random_moments_during_save_loops_leaves_old_or_new(tmp_path, fork_server):
    "Many SIGKILLs of writers that save the same folder/checkpoint/files repeatedly; temp files left behind are ignored."
    rng, leftovers, kills = random.Random(0), set(), 0
    checks = {"sae": lambda r: check_sae_folder(r / "sae"), "checkpoint": check_checkpoints, "files": check_files}
    for mode, check in checks.items():
        root = tmp_path / mode
        root.mkdir()
        t0 = time.perf_counter()
        if mode == "sae": V[0]["sae"].save(root / "sae")
        elif mode == "checkpoint": write_checkpoint(root, 1, V[1], 1)  # noqa: F821
        else: write_files(root, V[0])  # noqa: F821
        one_write = time.perf_counter() - t0  # kills land within the first ~4 writes, wherever this disk is slow or fast
        seen = set()
        for n in range(25):
            pid = fork_server.start("save", mode, root, n)
            time.sleep(rng.uniform(0.0, 4 * one_write + 0.005))
            os.kill(pid, signal.SIGKILL)
            assert fork_server.wait(pid) == -signal.SIGKILL, fork_server.log()  # still writing when killed
            kills += 1
            seen.add(check(root))  # whole, and exactly one of the two versions
            leftovers |= {p.name for p in root.rglob("*") if p.name.endswith((".tmp", ".old"))}
        assert len(seen) == 2, f"{mode}: the kills never caught the second version; writes too slow?"
    assert kills == 75
    assert leftovers, "no kill landed mid-write (no temp file ever left behind), so the test proved nothing"


def test_loaders_ignore_leftover_temp_files(tmp_path, glass):
    from sae_nb.activations import ActivationStore
    model, tokens = glass
    V[0]["sae"].save(tmp_path / "sae")
    (tmp_path / "sae" / f".{SAE_WEIGHTS_FILENAME}.abc123.tmp").write_bytes(b"\x00garbage")
    (tmp_path / f".sae.xyz.tmp").mkdir(); (tmp_path / ".sae.xyz.tmp" / SAE_CFG_FILENAME).write_text("{torn")
    assert_same_sae(SAE.load(tmp_path / "sae"), V[0]["sae"])
    write_checkpoint(tmp_path / "run", 1, V[1], 1)  # noqa: F821
    ck = tmp_path / "run" / "checkpoints"
    (ck / ".step_2.tmp").mkdir(); (ck / ".step_2.tmp" / "trainer_state.json").write_text("{torn")
    (ck / ".latest.q1w2e3.tmp").write_text("step_2")
    assert check_checkpoints(tmp_path / "run") == 1
    store = ActivationStore(model, tokens[:8], HOOK, batch_size=16, shuffle=False, loop=False, show_progress=False)
    store.save_cache(tmp_path / "cache")
    (tmp_path / "cache" / ".shard_00000.safetensors.k9.tmp").write_bytes(b"\x00" * 10)
    (tmp_path / "cache" / "shard_00001.safetensors").write_bytes(b"not listed in metadata.json")
    cached = ActivationStore.from_cache(tmp_path / "cache", batch_size=16, shuffle=False, loop=False, show_progress=False)
    store.reset()
    assert torch.equal(torch.cat(list(cached)), torch.cat(list(store)))


# ---------------------------------------------------------------------------------------------------------------
# Untrusted files: nothing is unpickled; every corrupt file gives one clear SaeNbError
# ---------------------------------------------------------------------------------------------------------------
PICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def pickle_risks(source: str) -> list:
    "Places in Python source that could (un)pickle: pickling imports, torch.load/save, np.load(allow_pickle=True)..."
    found = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            found += [(line, a.name) for a in node.names if a.name.split(".")[0] in PICKLING_MODULES]
        elif isinstance(node, ast.ImportFrom):
            mod = (node.module or "").split(".")[0]
            if mod in PICKLING_MODULES: found.append((line, mod))
            if mod == "torch" and any(a.name in ("load", "save") for a in node.names): found.append((line, "from torch import load/save"))
        elif isinstance(node, ast.Attribute):
            parts, cur = [node.attr], node.value
            while isinstance(cur, ast.Attribute): parts.append(cur.attr); cur = cur.value
            if isinstance(cur, ast.Name):
                dotted = ".".join([cur.id] + parts[::-1])
                if dotted in ("torch.load", "torch.save") or cur.id in PICKLING_MODULES: found.append((line, dotted))
        elif isinstance(node, ast.Name) and node.id in PICKLING_MODULES: found.append((line, node.id))
        elif isinstance(node, ast.Call):
            for kw in node.keywords:
                bad_value = not (isinstance(kw.value, ast.Constant) and kw.value.value is False)
                if kw.arg == "allow_pickle" and bad_value: found.append((line, "allow_pickle=True"))
                if kw.arg == "weights_only" and not (isinstance(kw.value, ast.Constant) and kw.value.value is True):
                    found.append((line, "weights_only=False"))
    # and the plain word anywhere in code (comments and strings, e.g. a docstring saying "no pickles", are fine)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and "pickle" in tok.string.lower() and tok.string != "allow_pickle":
            found.append((tok.start[0], tok.string))
    return sorted(set(found))


def test_the_pickle_scan_finds_what_it_looks_for():
    bad = ("import pickle\nfrom dill import loads\nimport numpy as np\nimport torch\nx = torch.load('f')\ntorch.save(x, 'f')\n"
           "np.load('f.npy', allow_pickle=True)\nfrom torch import load\ncloudpickle_dump = 1\n"
           "torch.serialization.load('f', weights_only=False)\n")
    got = {what for _, what in pickle_risks(bad)}
    assert {"pickle", "dill", "torch.load", "torch.save", "allow_pickle=True", "from torch import load/save",
            "cloudpickle_dump", "weights_only=False"} <= got
    assert pickle_risks('"""No pickles here."""\n# nor pickle here\nnp.load("a.npy", allow_pickle=False)\n') == []


def test_no_pickle_or_torch_load_anywhere_in_the_package():
    files = sorted((ROOT / "sae_nb").glob("*.py"))
    assert len(files) >= 10
    risks = {p.name: r for p in files if (r := pickle_risks(p.read_text()))}
    assert risks == {}, f"pickle-capable code in the package: {risks}"


def write_targets(source: str) -> list:
    "Lines that write a file other than through `with atomic_path(...)` (open for writing, write_text, save_file...)."
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    def inside_atomic(node):
        while node in parents:
            node = parents[node]
            if isinstance(node, ast.With) and any(isinstance(i.context_expr, ast.Call) and getattr(i.context_expr.func, "id", "") == "atomic_path" for i in node.items):
                return True
            if isinstance(node, ast.FunctionDef) and node.name in ("atomic_path", "_save_tokenizer_atomic"): return True  # see README
        return False
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call): continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        receiver = getattr(getattr(node.func, "value", None), "id", None)
        writes = name in ("write_text", "write_bytes", "save_file", "save_pretrained", "dump", "write_html") or (
            name in ("save", "savez", "savez_compressed", "tofile") and receiver in ("np", "numpy", "torch"))
        if name == "open":
            mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
            writes = isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax+")
        if writes and not inside_atomic(node): found.append((node.lineno, name))
    return sorted(found)


def test_every_file_the_package_writes_goes_through_a_temporary_name():
    assert write_targets("with atomic_path(p) as t: Path(t).write_text('x')\nPath(p).write_text('x')\nopen(p, 'w')\n") == \
        [(2, "write_text"), (3, "open")]
    found = {p.name: w for p in sorted((ROOT / "sae_nb").glob("*.py")) if (w := write_targets(p.read_text()))}
    assert found == {}, f"direct (non-atomic) writes: {found}"


def _cfg_edit(**changes):
    def edit(folder):
        d = json.loads((folder / SAE_CFG_FILENAME).read_text())
        for k, v in changes.items():
            if v is KeyError: d.pop(k)
            else: d[k] = v
        (folder / SAE_CFG_FILENAME).write_text(json.dumps(d))
    return edit


def _weights_edit(fn):
    def edit(folder):
        w = load_safetensors_checked(folder / SAE_WEIGHTS_FILENAME)
        fn(w)
        save_safetensors_atomic(w, folder / SAE_WEIGHTS_FILENAME)
    return edit


def _set(w, name, value): w[name] = value


@pytest.mark.parametrize("corrupt, problem", [
    (_cfg_edit(d_sae=99), "'W_enc' has shape (16, 32) but cfg.json (d_in=16, d_sae=99) needs (16, 99)"),
    (_weights_edit(lambda w: _set(w, "W_dec", w["W_dec"][:, :8])), "'W_dec' has shape (32, 8)"),
    (_weights_edit(lambda w: w.pop("b_enc")), "missing tensor(s) ['b_enc']"),
    (_weights_edit(lambda w: _set(w, "extra", torch.zeros(2))), "unexpected tensor(s) ['extra']"),
    (_weights_edit(lambda w: w["W_enc"].__setitem__((3, 3), float("nan"))), "'W_enc' contains NaN or inf"),
    (_weights_edit(lambda w: w["b_dec"].__setitem__(0, float("-inf"))), "'b_dec' contains NaN or inf"),
    (_weights_edit(lambda w: _set(w, "b_dec", w["b_dec"].to(torch.int32))), "'b_dec' has dtype torch.int32"),
    (lambda f: (f / SAE_CFG_FILENAME).write_text("{\"d_in\": 16,"), "cfg.json: not valid JSON"),
    (lambda f: (f / SAE_CFG_FILENAME).write_bytes(b"\xff\xfe\x00"), "cfg.json: not valid JSON"),
    (lambda f: (f / SAE_CFG_FILENAME).write_text("[1, 2]"), "expected a JSON object"),
    (_cfg_edit(architecture="clt"), "architecture 'clt' is not supported"),
    (_cfg_edit(architecture=KeyError), "no 'architecture' field"),
    (_cfg_edit(d_in=KeyError), "missing field 'd_in'"),
    (_cfg_edit(d_in="16"), "SAEConfig.d_in='16'"),
    (_cfg_edit(dtype="int8"), "dtype='int8' is not supported"),
    (_cfg_edit(d_sae=10 ** 15), "d_sae=1000000000000000) needs"),  # refused before allocating petabytes
    (lambda f: (f / SAE_CFG_FILENAME).unlink(), "cfg.json: file not found"),
    (lambda f: (f / SAE_WEIGHTS_FILENAME).write_bytes((f / SAE_WEIGHTS_FILENAME).read_bytes()[:-7]), "not a readable safetensors file"),
    (lambda f: (f / SAE_WEIGHTS_FILENAME).write_bytes(b""), "not a readable safetensors file"),
    (lambda f: (f / SAE_WEIGHTS_FILENAME).write_bytes(struct.pack("<Q", 2 ** 62) + b"{}"), "not a readable safetensors file"),
], ids=["cfg-d_sae", "shape", "missing", "extra", "nan", "inf", "int-dtype", "cfg-torn", "cfg-binary", "cfg-list",
        "unknown-arch", "no-arch", "no-d_in", "d_in-str", "dtype", "huge", "no-cfg", "weights-truncated", "weights-empty",
        "header-length"])
def test_a_corrupt_sae_folder_raises_one_clear_error(tmp_path, corrupt, problem):
    folder = V[0]["sae"].save(tmp_path / "sae")
    corrupt(folder)
    with pytest.raises(SaeNbError) as e: SAE.load(folder)
    assert problem in str(e.value) and str(folder) in str(e.value), str(e.value)


# --- the fuzz ----------------------------------------------------------------------------------------------------
FUZZ_SAES = {}


def _fuzz_base(arch):
    "Bytes of a valid saved SAE folder of each architecture (tiny, non-trivial values), made once."
    if arch not in FUZZ_SAES:
        k = {"topk": 3, "batchtopk": 2, "matryoshka_batchtopk": 2}.get(arch)
        sae = SAE.from_config(SAEConfig(architecture=arch, d_in=6, d_sae=10, k=k, hook_name=HOOK, model_name="glassllm-en"),
                              generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            for n in sae.norm_scaled: getattr(sae, n).uniform_(-0.1, 0.1)  # b_enc; gated: its gate and magnitude vectors
            sae.b_dec.uniform_(-1, 1)
        with tempfile.TemporaryDirectory() as d:
            sae.save(Path(d) / "s")
            FUZZ_SAES[arch] = {n: (Path(d) / "s" / n).read_bytes() for n in (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME)}
    return dict(FUZZ_SAES[arch])


def _json_paths(d, prefix=()):
    out = []
    for k, v in d.items():
        out.append(prefix + (k,))
        if isinstance(v, dict): out += _json_paths(v, prefix + (k,))
    return out


def _json_edit(d, path, value, drop):
    target = d
    for k in path[:-1]: target = target[k]
    if drop: target.pop(path[-1], None)
    else: target[path[-1]] = value


def _split_safetensors(b):
    n = struct.unpack("<Q", b[:8])[0]
    return json.loads(b[8:8 + n]), b[8 + n:]


def _join_safetensors(header, data):
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=6)
    | st.sampled_from(list(ARCHITECTURES) + list(DTYPES) + ["none", "cuda:3", "torch.float32", "expected_average_only_in"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=4)
ST_DTYPES = ["F16", "BF16", "F32", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "C64", "XX"]
TORCH_DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.uint8, torch.bool, torch.float8_e4m3fn,
                torch.float8_e5m2]
MUTATIONS = st.one_of(
    st.tuples(st.just("flip"), st.sampled_from([SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME]),
              st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 7)), min_size=1, max_size=6)),
    st.tuples(st.just("truncate"), st.sampled_from([SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME]), st.floats(0, 1)),
    st.tuples(st.just("json"), st.integers(0, 10 ** 6), JSON_VALUES, st.booleans()),
    st.tuples(st.just("header"), st.integers(0, 10 ** 6),
              st.sampled_from(["drop", "dtype", "shape", "offsets", "rename"]),
              st.sampled_from(ST_DTYPES), st.lists(st.integers(-1, 2 ** 40), max_size=3)),
    st.tuples(st.just("header-meta"), st.sampled_from(["format", "sae_nb_save_id", "sae_nb_cfg"]),
              st.one_of(st.none(), st.text(max_size=8), st.integers(0, 9))),
    st.tuples(st.just("own-cfg"), st.integers(0, 10 ** 6), JSON_VALUES, st.booleans()),  # the config stored in the header
    st.tuples(st.just("tensor"), st.integers(0, 10 ** 6), st.sampled_from(["reshape", "retype", "nan", "inf", "huge"]),
              st.sampled_from(TORCH_DTYPES), st.integers(1, 12)),
    st.tuples(st.just("header-length"), st.integers(0, 2 ** 64 - 1)),
)


def _apply(files, mutation):
    kind = mutation[0]
    if kind == "flip":
        _, name, flips = mutation
        b = bytearray(files[name])
        if not b: return
        for pos, bit in flips: b[pos % len(b)] ^= 1 << bit
        files[name] = bytes(b)
    elif kind == "truncate":
        files[mutation[1]] = files[mutation[1]][:int(mutation[2] * len(files[mutation[1]]))]
    elif kind in ("json", "own-cfg"):
        _, index, value, drop = mutation
        try:
            cfg_json = json.loads(files[SAE_CFG_FILENAME])
            if kind == "json": d = cfg_json
            else:
                header, data = _split_safetensors(files[SAE_WEIGHTS_FILENAME])
                d = json.loads(header["__metadata__"]["sae_nb_cfg"])
                cfg_json["metadata"]["sae_nb_save_id"] = "another-save"
            paths = _json_paths(d)
        except Exception: return  # an earlier mutation already broke what this one edits
        if not paths: return
        _json_edit(d, paths[index % len(paths)], value, drop)
        if kind == "own-cfg":  # a cfg.json from another save: the loader then goes by the config stored with the weights
            header["__metadata__"]["sae_nb_cfg"] = json.dumps(d)
            files[SAE_WEIGHTS_FILENAME] = _join_safetensors(header, data)
        files[SAE_CFG_FILENAME] = json.dumps(cfg_json).encode()
    elif kind in ("header", "header-meta"):
        try: header, data = _split_safetensors(files[SAE_WEIGHTS_FILENAME])
        except Exception: return
        if kind == "header-meta":
            _, key, value = mutation
            meta = header.setdefault("__metadata__", {})
            if value is None: meta.pop(key, None)
            else: meta[key] = value
        else:
            _, index, op, dtype, numbers = mutation
            names = sorted(k for k in header if k != "__metadata__")
            name = names[index % len(names)]
            if op == "drop": header.pop(name)
            elif op == "dtype": header[name]["dtype"] = dtype
            elif op == "shape": header[name]["shape"] = numbers
            elif op == "offsets": header[name]["data_offsets"] = numbers
            else: header["threshold" if name != "threshold" else "W_enc"] = header.pop(name)
        files[SAE_WEIGHTS_FILENAME] = _join_safetensors(header, data)
    elif kind == "tensor":
        _, index, op, dtype, size = mutation
        try: w = {k: v.clone() for k, v in _load_bytes(files[SAE_WEIGHTS_FILENAME]).items()}
        except Exception: return
        name = sorted(w)[index % len(sorted(w))]
        if op == "reshape": w[name] = torch.zeros(size, *w[name].shape[1:])
        elif op == "retype": w[name] = w[name].to(dtype)
        elif op in ("nan", "inf"): w[name].view(-1)[size % w[name].numel()] = float(op)
        else: w[name] = w[name].double() * 1e300
        from safetensors.torch import save as save_bytes
        files[SAE_WEIGHTS_FILENAME] = save_bytes(w)
    else:
        files[SAE_WEIGHTS_FILENAME] = struct.pack("<Q", mutation[1]) + files[SAE_WEIGHTS_FILENAME][8:]


def _load_bytes(b):
    from safetensors.torch import load
    return load(b)


def assert_valid_sae(sae):
    "A loaded SAE is self-consistent: valid config, tensors of the config's shapes and dtype, finite, and it runs."
    cfg = SAEConfig.from_dict(sae.cfg.to_dict())
    assert sae.architecture == cfg.architecture
    shapes = {"W_enc": (cfg.d_in, cfg.d_sae), "W_dec": (cfg.d_sae, cfg.d_in), "b_enc": (cfg.d_sae,), "b_dec": (cfg.d_in,),
              "threshold": (cfg.d_sae,), "b_gate": (cfg.d_sae,), "b_mag": (cfg.d_sae,), "r_mag": (cfg.d_sae,)}
    for n in sae.tensor_names:
        t = getattr(sae, n)
        # thresholds stay float32 (or wider) whatever the SAE's dtype: a bf16 threshold cannot learn
        dtype = torch.promote_types(DTYPES[cfg.dtype], torch.float32) if n == "threshold" else DTYPES[cfg.dtype]
        assert tuple(t.shape) == shapes[n] and t.dtype == dtype and bool(torch.isfinite(t).all()), n
    assert sae(torch.randn(2, cfg.d_in)).shape == (2, cfg.d_in)


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 150)), deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(arch=st.sampled_from(ARCHITECTURES), mutations=st.lists(MUTATIONS, min_size=1, max_size=3))
def test_fuzzed_sae_folders_load_as_a_valid_sae_or_raise_a_clear_error(tmp_path_factory, arch, mutations):
    """Only two outcomes: `SaeNbError` naming the folder, or a self-consistent SAE. Not "equal to the original": the
    format has no checksum, so a flipped mantissa bit is a different but perfectly valid SAE (as in SAELens)."""
    files = _fuzz_base(arch)
    for m in mutations: _apply(files, m)
    folder = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    try:
        for name, data in files.items(): (folder / name).write_bytes(data)
        try: sae = load_quietly(folder)
        except SaeNbError as e:
            assert str(folder) in str(e), str(e)
            event("SaeNbError")
        else:
            assert_valid_sae(sae)
            event("loaded a valid SAE")
    finally: shutil.rmtree(folder)


# --- activation caches -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache_folder(glass, tmp_path_factory):
    from sae_nb.activations import ActivationStore
    model, tokens = glass
    folder = tmp_path_factory.mktemp("cache") / "c"
    ActivationStore(model, tokens[:6], HOOK, batch_size=16, shuffle=False, loop=False, show_progress=False).save_cache(folder)
    return folder


def _open_cache(folder, **kw):
    from sae_nb.activations import ActivationStore
    return next(iter(ActivationStore.from_cache(folder, batch_size=16, show_progress=False, **kw)))


def _meta_edit(fn):
    def edit(folder):
        m = json.loads((folder / "metadata.json").read_text())
        fn(m)
        (folder / "metadata.json").write_text(json.dumps(m))
    return edit


def _shard_write(tensor_fn):
    def edit(folder):
        w = load_safetensors_checked(folder / "shard_00000.safetensors")
        save_safetensors_atomic({"activations": tensor_fn(w["activations"])}, folder / "shard_00000.safetensors")
    return edit


def _cache_case(tmp_path, cache_folder, corrupt):
    folder = tmp_path / "c"
    shutil.copytree(cache_folder, folder)
    corrupt(folder)
    return folder


@pytest.mark.parametrize("corrupt, problem, kw", [
    (_meta_edit(lambda m: m["shards"][0].update(rows=m["shards"][0]["rows"] + 1)), "metadata.json says", {}),
    (_meta_edit(lambda m: m.update(d_in=340)), "width 341, metadata.json says", {}),
    (_meta_edit(lambda m: m.update(n_tokens=m["n_tokens"] * 2)), "the shards hold", {}),
    (_meta_edit(lambda m: m["shards"].append({"file": "shard_00001.safetensors", "rows": 15})), "missing", {}),
    (_shard_write(lambda t: t[:-15]), "holds 75 rows", {}),
    (_shard_write(lambda t: t[:, :100]), "width 100", {}),
    (lambda f: (f / "shard_00000.safetensors").write_bytes(b"\x01" * 64), "not a readable activation shard", {}),
    (lambda f: (f / "metadata.json").write_text("{\"format\": "), "not valid JSON", {}),
    (lambda f: (f / "metadata.json").unlink(), "not an activation cache", {}),
    (_meta_edit(lambda m: m.update(format="something-else")), "not sae_nb activation-cache metadata", {}),
    (lambda f: None, "holds activations of hook", dict(expect_hook="blocks.1.mlp.hook_post")),
    (lambda f: None, "holds activations of model", dict(expect_model="smollm2-135m")),
], ids=["rows", "width", "n_tokens", "missing-shard", "short-shard", "narrow-shard", "garbage-shard", "torn-metadata",
        "no-metadata", "format", "other-hook", "other-model"])
def test_an_activation_cache_that_does_not_match_its_metadata_raises_one_clear_error(tmp_path, cache_folder, corrupt, problem, kw):
    folder = _cache_case(tmp_path, cache_folder, corrupt)
    with pytest.raises(SaeNbError) as e: _open_cache(folder, **kw)
    assert problem in str(e.value) and str(folder) in str(e.value), str(e.value)


@pytest.mark.parametrize("corrupt", [
    _meta_edit(lambda m: m.pop("shards")), _meta_edit(lambda m: m.update(shards="x")),
    _meta_edit(lambda m: m["shards"][0].update(rows="many")), _meta_edit(lambda m: m["shards"][0].pop("file")),
    _meta_edit(lambda m: m.pop("d_in")), _meta_edit(lambda m: m.pop("hook_name")), _meta_edit(lambda m: m.pop("exclude_bos")),
    lambda f: (f / "metadata.json").write_text("[1, 2]"),
], ids=["no-shards", "shards-str", "rows-str", "no-file", "no-d_in", "no-hook", "no-exclude_bos", "list"])
def test_malformed_cache_metadata_raises_a_clear_error(tmp_path, cache_folder, corrupt):
    folder = _cache_case(tmp_path, cache_folder, corrupt)
    with pytest.raises(SaeNbError): _open_cache(folder)


@pytest.mark.parametrize("corrupt", [
    _shard_write(lambda t: t.to(torch.int32)), _meta_edit(lambda m: m.update(dtype="float16")),
    _meta_edit(lambda m: m.update(rows_per_window=30, n_windows=3)),
    _meta_edit(lambda m: m["shards"][0].update(file="../c/shard_00000.safetensors")),
], ids=["int-shard", "dtype", "rows_per_window", "path-escape"])
def test_cache_metadata_contradicting_its_shards_raises_a_clear_error(tmp_path, cache_folder, corrupt):
    folder = _cache_case(tmp_path, cache_folder, corrupt)
    with pytest.raises(SaeNbError): _open_cache(folder)


# --- checkpoints -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    train_sae(make_data(256, d_in=8), SAEConfig(d_in=8, d_sae=16), tiny_train_cfg(steps=8, checkpoint_every=4, out_dir=out))
    return out


def _state_edit(**changes):
    def edit(ck):
        j = json.loads((ck / "trainer_state.json").read_text())
        for k, v in changes.items():
            if v is KeyError: j.pop(k)
            else: j[k] = v
        (ck / "trainer_state.json").write_text(json.dumps(j))
    return edit


def _state_tensor(name, value):
    def edit(ck):
        t = load_safetensors_checked(ck / "trainer_state.safetensors")
        if value is KeyError: t.pop(name)
        else: t[name] = value
        save_safetensors_atomic(t, ck / "trainer_state.safetensors")
    return edit


@pytest.mark.parametrize("corrupt", [
    pytest.param(lambda ck: (ck / "trainer_state.json").write_text("{torn"), id="json-torn"),
    pytest.param(lambda ck: (ck / "trainer_state.safetensors").write_bytes(b"\x00" * 30), id="tensors-garbage"),
    pytest.param(lambda ck: (ck / SAE_WEIGHTS_FILENAME).write_bytes(b""), id="sae-weights-empty"),
    pytest.param(lambda ck: (ck.parent / "latest").write_text("step_99\n"), id="latest-dangling"),
    pytest.param(_state_edit(step=KeyError), id="no-step"),
    pytest.param(_state_edit(step="eight"), id="step-str"),
    pytest.param(_state_edit(optimizer=KeyError), id="no-optimizer"),
    pytest.param(_state_edit(rng={"python": [1, [], None], "numpy": []}), id="rng-bad"),
    pytest.param(_state_edit(data_state=[{"kind": "tensor"}]), id="data-state-bad"),
    pytest.param(lambda ck: (ck / "trainer_state.json").write_text("[]"), id="json-list"),
    pytest.param(_state_tensor("rng.torch", KeyError), id="no-rng-tensor"),
    pytest.param(_state_tensor("optimizer.W_enc.exp_avg", torch.zeros(3)), id="adam-shape"),
    pytest.param(_state_tensor("tokens_since_fired", torch.zeros(3, dtype=torch.int64)), id="counter-shape"),
])
def test_resuming_from_a_corrupt_checkpoint_raises_one_clear_error(tmp_path, run_folder, corrupt):
    out = tmp_path / "run"
    shutil.copytree(run_folder, out)
    corrupt(latest_checkpoint(out))
    with pytest.raises(SaeNbError) as e:
        train_sae(make_data(256, d_in=8), SAEConfig(d_in=8, d_sae=16), tiny_train_cfg(steps=12, checkpoint_every=4, out_dir=out, resume=True))
    assert str(out) in str(e.value), str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a clear SaeNbError before any long work
# ---------------------------------------------------------------------------------------------------------------
def test_hook_not_in_the_model(glass):
    from sae_nb.activations import ActivationStore
    model, tokens = glass
    with pytest.raises(SaeNbError, match=r"Hook 'blocks.7.mlp.hook_post' is not in model .* close names"):
        ActivationStore(model, tokens, "blocks.7.mlp.hook_post")


def test_cli_refuses_bad_input_before_any_long_work(tmp_path, glass, capsys):
    from sae_nb.cli import main
    cases = {"hook": (["--hook", "blocks.0.mlp.hook_pots"], "is not in model"),
             "context": (["--context-size", "129"], "longer than the model's context (n_ctx=128)"),
             "device": (["--device", "cuda:99"], "cuda:99"),
             "device-name": (["--device", "tpu"], "Unknown device 'tpu'")}
    for name, (args, problem) in cases.items():
        out = tmp_path / name
        t0 = time.perf_counter()
        rc = main(["train", "--model", "glassllm-en", "--corpus", "pydoc", "--steps", "5000", "--out", str(out), *args])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("sae_nb train: error:")]
        assert rc == 2 and len(errors) == 1 and problem in errors[0], (name, err)
        assert time.perf_counter() - t0 < 30 and not (out.exists() and any(out.rglob("*"))), name  # nothing written


def test_activations_of_the_wrong_width(glass, tmp_path):
    from sae_nb.activations import ActivationStore
    model, tokens = glass
    cfg = SAEConfig(d_in=100, d_sae=200)
    store = ActivationStore(model, tokens, HOOK, batch_size=32, show_progress=False)
    with pytest.raises(SaeNbError, match="The data has d_in=341 but the SAE has d_in=100"): train_sae(store, cfg, tiny_train_cfg())
    with pytest.raises(SaeNbError, match="The data has width 7 but the SAE has d_in=100"): train_sae(torch.randn(64, 7), cfg, tiny_train_cfg())
    with pytest.raises(SaeNbError, match=r"shape \(3, 7\) but the SAE reads d_in=100"): SAE.from_config(cfg).encode(torch.randn(3, 7))
    out = tmp_path / "run"
    wrong_later = [torch.randn(32, 100)] * 3 + [torch.randn(32, 99)]
    with pytest.raises(SaeNbError, match=r"Step 4: the data gave a batch of \(32, 99\)"):
        train_sae(wrong_later, cfg, tiny_train_cfg(out_dir=out, checkpoint_every=2))
    assert latest_checkpoint(out).name == "step_2"


def test_empty_corpora_and_empty_data(glass):
    from sae_nb.activations import ActivationStore
    from sae_nb.data import Corpus, tokenize_corpus
    model, _ = glass
    for texts in ([], ["", ""], Corpus("empty", lambda: iter(()))):
        with pytest.raises(SaeNbError, match="no documents|no tokens"): tokenize_corpus(texts, model, show_progress=False)
    with pytest.raises(SaeNbError, match="need a non-empty"): ActivationStore(model, torch.zeros(0, 16, dtype=torch.long), HOOK)
    cfg = SAEConfig(d_in=8, d_sae=16)
    with pytest.raises(SaeNbError, match="fewer than one batch"): train_sae(torch.zeros(0, 8), cfg, tiny_train_cfg())
    with pytest.raises(SaeNbError, match="yielded no batch"): train_sae([], cfg, tiny_train_cfg())


@pytest.mark.filterwarnings("ignore:The data ran out")
def test_empty_data_without_b_dec_init_is_refused(tmp_path):
    with pytest.raises(SaeNbError):
        train_sae([], SAEConfig(d_in=8, d_sae=16), tiny_train_cfg(b_dec_init=None, out_dir=tmp_path / "run"))


def test_context_longer_than_the_model(glass):
    from sae_nb.activations import ActivationStore
    from sae_nb.data import tokenize_corpus
    model, _ = glass
    with pytest.raises(SaeNbError, match=r"context_size=129 is longer than the model's context \(n_ctx=128\)"):
        tokenize_corpus(["some text"], model, context_size=129)
    with pytest.raises(SaeNbError, match="longer than the model's context"):
        ActivationStore(model, torch.ones(2, 129, dtype=torch.long), HOOK)


def test_batch_larger_than_the_buffer_or_the_data(glass):
    from sae_nb.activations import ActivationStore
    model, tokens = glass
    with pytest.raises(SaeNbError, match="buffer_size=40 rows is too small for batch_size=64"):
        ActivationStore(model, tokens, HOOK, batch_size=64, buffer_size=40)
    with pytest.raises(SaeNbError, match="fewer than one batch of batch_size=32"):
        train_sae(torch.randn(10, 8), SAEConfig(d_in=8, d_sae=16), tiny_train_cfg())
    store = ActivationStore(model, tokens, HOOK, batch_size=64, show_progress=False)
    with pytest.raises(SaeNbError, match="yields batches of 64 rows but TrainConfig.batch_size=32"):
        train_sae(store, SAEConfig(d_in=341, d_sae=64), tiny_train_cfg())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_nan_or_inf_activations_stop_training_with_the_step_and_keep_the_last_good_checkpoint(tmp_path, bad):
    data = batches_of(make_data(512, d_in=8), 32)
    data[7] = data[7].clone(); data[7][5, 2] = bad  # the batch of step 8
    out = tmp_path / "run"
    with pytest.raises(SaeNbError, match="The input batch of step 8 contains NaN or inf") as e:
        train_sae(data, SAEConfig(d_in=8, d_sae=16), tiny_train_cfg(steps=14, checkpoint_every=5, log_every=100, out_dir=out))
    assert "step_5" in str(e.value)  # the message names the checkpoint kept
    assert latest_checkpoint(out).name == "step_5" and not (out / "checkpoints" / "step_10").exists()
    assert not (out / "sae").exists()
    assert_valid_sae(SAE.load(latest_checkpoint(out)))


def test_a_device_that_does_not_exist(glass, tmp_path):
    from sae_nb.models import load_model
    missing = f"cuda:{torch.cuda.device_count() + 3}"
    for device in (missing, "tpu", "cuda:x") + (() if torch.backends.mps.is_available() else ("mps",)):
        with pytest.raises(SaeNbError, match=f"Device|device"): get_device(device)
        out = tmp_path / device.replace(":", "_")
        with pytest.raises(SaeNbError): train_sae(torch.randn(64, 8), SAEConfig(d_in=8, d_sae=16), tiny_train_cfg(device=device, out_dir=out))
        assert not out.exists()  # refused before the run folder is made
        with pytest.raises(SaeNbError): SAE.from_config(SAEConfig(d_in=8, d_sae=16, device=device))
    model, tokens = glass
    from sae_nb.activations import ActivationStore
    with pytest.raises(SaeNbError, match=missing): ActivationStore(model, tokens, HOOK, device=missing)
    with pytest.raises(SaeNbError, match=missing): load_model("glassllm-en", device=missing)
    V[0]["sae"].save(tmp_path / "sae")
    with pytest.raises(SaeNbError, match=missing): SAE.load(tmp_path / "sae", device=missing)


# ---------------------------------------------------------------------------------------------------------------
# Numerical health
# ---------------------------------------------------------------------------------------------------------------
def test_a_loss_that_overflows_stops_training_with_the_step():
    data = batches_of(make_data(512, d_in=8), 32)
    data[4] = data[4] * 1e30  # finite activations whose squared error overflows float32
    with pytest.raises(SaeNbError, match="The loss became NaN or inf at step 5"):
        train_sae(data, SAEConfig(d_in=8, d_sae=16), tiny_train_cfg(grad_clip_norm=None))


def test_history_logs_decoder_norms_and_dead_fractions(tmp_path):
    sae = SAE.from_config(SAEConfig(d_in=8, d_sae=16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(): sae.b_enc[:8] = -1e4  # half the features can never fire on these inputs
    out = tmp_path / "run"
    _, history = train_sae(make_data(512, d_in=8), sae, tiny_train_cfg(steps=12, log_every=3, dead_feature_window=64,
                                                                       b_dec_init=None, out_dir=out))
    assert history["step"] == [3, 6, 9, 12] and read_json(out / "history.json") == history
    for k in ("decoder_norm_mean", "decoder_norm_min", "decoder_norm_max"):
        assert all(abs(v - 1) < 1e-5 for v in history[k]), (k, history[k])  # unit-norm decoder rows, checked each log
    assert all(0.5 <= v < 1.0 for v in history["dead_fraction"]), history["dead_fraction"]  # the 8 blocked ones, at least
    _, healthy = train_sae(make_data(512, d_in=8), SAEConfig(d_in=8, d_sae=16), tiny_train_cfg(steps=12, log_every=3, dead_feature_window=64))
    assert max(healthy["dead_fraction"]) < 0.5, healthy["dead_fraction"]
