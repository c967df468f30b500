"""Edge cases of the `sae_nb` command (10_cli): resume with other settings, bad numbers, per-head hooks, the eval
defaults, huge sizes, short windows, full disks, interrupts. In-process through `sae_nb.cli.main` where possible;
subprocesses only where a real signal and exit code matter. All on the tiny glassllm-en model."""
import contextlib
import errno
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sae_nb.cli as cli
import sae_nb.train as train
from sae_nb.sae import SAE

ROOT = Path(__file__).resolve().parents[1]
S = ["--model", "glassllm-en", "--batch-size", "64", "--context-size", "32", "--eval-windows", "2", "--no-report"]


def run(*argv) -> tuple:
    "main(argv) in-process: (exit code, stdout, stderr)."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: code = cli.main([str(a) for a in argv])
        except SystemExit as e: code = e.code
    return code, out.getvalue(), err.getvalue()


def one_line(err: str) -> str:
    "The one line a failed command writes to stderr (progress bars aside), with no traceback."
    lines = [l for l in err.replace("\r", "\n").splitlines() if l.startswith("sae_nb")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def forbid(monkeypatch, *names):
    "Make the long work in sae_nb.cli fail loudly: a refusal must come before it."
    def boom(*a, **k): raise AssertionError("long work started before the refusal")
    for n in names: monkeypatch.setattr(cli, n, boom)


@pytest.fixture(scope="module")
def run6(tmp_path_factory):
    "A finished 6-step run (standard SAE on blocks.0.mlp.hook_post)."
    out = tmp_path_factory.mktemp("runs") / "run6"
    code, _, err = run("train", *S, "--steps", 6, "--checkpoint-every", 3, "--out", out)
    assert code == 0, err
    return out


# 11. --resume with another corpus / model / hook / context size / architecture / width: refused before loading

@pytest.mark.parametrize("opt", [["--corpus", "kjv"], ["--model", "gelu-1l"], ["--hook", "blocks.1.mlp.hook_post"],
                                 ["--context-size", "16"], ["--architecture", "topk"], ["--width", "99"],
                                 ["--expansion", "8"], ["--seed", "5"], ["--eval-windows", "3"]])
def test_resume_refuses_changed_run_settings(run6, monkeypatch, opt):
    forbid(monkeypatch, "load_model", "tokenize_corpus", "train_sae")
    code, _, err = run("train", *S, "--steps", 6, "--out", run6, "--resume", *opt)
    line = one_line(err)
    assert code == 2 and f"{opt[0]} {opt[1]}" in line and "Cannot resume" in line, line
    saved = {"--corpus": "pydoc", "--model": "glassllm-en", "--hook": "blocks.0.mlp.hook_post", "--context-size": "32",
             "--architecture": "standard", "--width": "1364", "--expansion": "--width 1364", "--seed": "0", "--eval-windows": "2"}[opt[0]]
    assert saved in line, line
    assert json.loads((run6 / "sae" / "cfg.json").read_text())["metadata"]["dataset_path"] == "pydoc"


def test_resume_takes_the_runs_own_settings(run6):
    # no options but --out/--resume: the defaults (smollm2, batch 1024, 400 steps...) are replaced by the run's own
    code, out, err = run("train", "--out", run6, "--resume", "--no-report")
    assert code == 0, err
    assert "glassllm-en blocks.0.mlp.hook_post" in out and "6 steps x 64 tokens" in out, out


# 12. a changed length on resume: one plain refusal, before any work

@pytest.mark.parametrize("opt", [["--steps", "60"], ["--tokens", "3840"], ["--batch-size", "32"]])
def test_resume_refuses_another_length(run6, monkeypatch, opt):
    forbid(monkeypatch, "load_model", "tokenize_corpus", "train_sae")
    code, _, err = run("train", *S, "--out", run6, "--resume", *opt)
    line = one_line(err)
    assert code == 2 and "cannot be extended or shortened" in line and "6 steps of 64 tokens" in line and "new --out" in line, line


# 15. seeds and learning rates checked by the parser

@pytest.mark.parametrize("opt", [["--seed", "-1"], ["--seed", "18446744073709551617"], ["--seed", str(2**63)], ["--seed", "1.5"],
                                 ["--lr", "0"], ["--lr", "-1e-3"], ["--lr", "nan"], ["--lr", "inf"], ["--out", ""]])
def test_bad_numbers_refused_by_the_parser(tmp_path, monkeypatch, opt):
    forbid(monkeypatch, "load_model", "tokenize_corpus", "train_sae")
    code, _, err = run("train", *S, "--steps", 2, "--out", tmp_path / "r", *opt)
    line = one_line(err)
    assert code == 2 and f"argument {opt[0]}" in line, line
    assert not (tmp_path / "r").exists()


def test_lr_and_largest_seed_are_used(tmp_path):
    args = cli.build_parser().parse_args(["train", *S, "--lr", "2e-5", "--seed", str(2**63 - 1)])
    args.out = str(tmp_path / "r")
    _, tc = cli._train_settings(args, 341)
    assert tc.lr == 2e-5 and tc.seed == 2**63 - 1
    args.lr = None
    assert cli._train_settings(args, 341)[1].lr == cli._DEFAULT_LR["standard"]
    code, _, err = run("train", *S, "--steps", 2, "--seed", 2**63 - 1, "--out", tmp_path / "r")
    assert code == 0, err


# 16 + 17. per-head hooks end to end; eval uses the SAE's own model and hook

def test_hook_z_trains_saves_and_evals(tmp_path):
    out = tmp_path / "z"
    code, _, err = run("train", *S, "--hook", "blocks.0.attn.hook_z", "--steps", 4, "--out", out)
    assert code == 0, err
    sae = SAE.load(out / "sae")
    assert sae.cfg.d_in == 4 * 32 and sae.cfg.hook_name == "blocks.0.attn.hook_z"
    code, stdout, err = run("eval", out / "sae", "--context-size", 32, "--tokens", 256)  # no --model/--hook: the SAE's own
    assert code == 0, err
    assert "glassllm-en blocks.0.attn.hook_z" in stdout, stdout
    code, _, err = run("eval", out / "sae", "--hook", "blocks.0.mlp.hook_post", "--tokens", 256)
    line = one_line(err)
    assert code == 2 and "--hook blocks.0.attn.hook_z" in line and "leave --hook out" in line, line
    code, _, err = run("eval", out / "sae", "--model", "gelu-1l", "--tokens", 256)
    assert code == 2 and "--model glassllm-en" in one_line(err)


@pytest.mark.parametrize("hook", ["blocks.0.attn.hook_q", "blocks.1.attn.hook_v"])
def test_hook_width_matches_the_store(hook):
    from sae_nb.models import load_model
    from sae_nb.activations import ActivationStore
    import torch
    model = load_model("glassllm-en")
    store = ActivationStore(model, torch.randint(3, 1000, (2, 8)), hook, batch_size=4, show_progress=False)
    heads = model.cfg.n_heads if hook.endswith("hook_q") else (model.cfg.n_key_value_heads or model.cfg.n_heads)  # GQA: fewer k/v heads
    assert cli._hook_width(model, hook) == store.d_in == heads * model.cfg.d_head


def test_eval_defaults_to_the_saes_hook(tmp_path):
    out = tmp_path / "mlp1"
    code, _, err = run("train", *S, "--hook", "blocks.1.mlp.hook_post", "--steps", 20, "--out", out)
    assert code == 0, err
    code, stdout, err = run("eval", out / "sae", "--context-size", 32, "--tokens", 256)
    assert code == 0, err
    assert "blocks.1.mlp.hook_post" in stdout
    ev = float(next(l for l in stdout.splitlines() if "explained_variance" in l).split()[1])  # "name value ± se"
    assert ev > 0.1, stdout   # on the default hook (blocks.0) it was ~0.004


# 21. huge sizes: refused with the figure, before tokenising

@pytest.mark.parametrize("opt", [["--width", "100000000"], ["--expansion", "1000000"], ["--batch-size", "100000000"]])
def test_huge_sizes_refused_before_tokenising(tmp_path, monkeypatch, opt):
    forbid(monkeypatch, "tokenize_corpus", "train_sae")
    code, _, err = run("train", *S, "--steps", 2, "--out", tmp_path / "r", *opt)
    line = one_line(err)
    assert code == 2 and "GB" in line and "need" in line, line


# 18. windows too short to score; NaN never reaches JSON

def test_two_token_windows_refused(tmp_path, monkeypatch):
    forbid(monkeypatch, "tokenize_corpus", "train_sae")
    code, _, err = run("train", *S, "--context-size", 2, "--steps", 2, "--out", tmp_path / "r")
    line = one_line(err)
    assert code == 2 and "--context-size 3" in line, line


def test_metrics_json_has_no_nan(tmp_path, monkeypatch):
    real = cli.evaluate
    def nan_metrics(*a, **k):
        m = real(*a, **k); m["loss_recovered"] = math.nan; m["kl"] = math.inf; return m
    monkeypatch.setattr(cli, "evaluate", nan_metrics)
    code, _, err = run("train", *S, "--steps", 2, "--out", tmp_path / "r")
    assert code == 0, err
    def no_constants(c): raise ValueError(f"invalid JSON constant {c}")
    m = json.loads((tmp_path / "r" / "metrics.json").read_text(), parse_constant=no_constants)
    assert m["loss_recovered"] is None and m["kl"] is None


# 23. disk full, collect's existing folder, empty --out

@pytest.mark.parametrize("error", ["oserror", "safetensors"])
def test_disk_full_is_one_line(tmp_path, monkeypatch, error):
    from safetensors import SafetensorError
    def full(*a, **k):
        if error == "oserror": raise OSError(errno.ENOSPC, "No space left on device")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
    monkeypatch.setattr(train, "_write_checkpoint", full)
    code, _, err = run("train", *S, "--steps", 4, "--checkpoint-every", 2, "--out", tmp_path / "r")
    line = one_line(err)
    assert code == 1 and "disk full?" in line and str(tmp_path / "r") in line and "--resume" in line, line


def test_collect_into_existing_folder(tmp_path, monkeypatch):
    forbid(monkeypatch, "load_model", "tokenize_corpus")
    (tmp_path / "acts").mkdir(); (tmp_path / "acts" / "mine.txt").write_text("user data")
    code, _, err = run("collect", "--model", "glassllm-en", "--tokens", 100, "--out", tmp_path / "acts")
    line = one_line(err)
    assert code == 2 and "--resume" not in line and "pick a new folder" in line, line
    code, _, err = run("collect", "--model", "glassllm-en", "--tokens", 100, "--out", "")
    assert code == 2 and "argument --out" in one_line(err)
    assert (tmp_path / "acts" / "mine.txt").read_text() == "user data"


# 10. interrupts: one line, 128 + signal

@pytest.mark.parametrize("exc,code", [(KeyboardInterrupt(), 130),
                                      (train.TrainingInterrupted("Training interrupted after step 3 (SIGTERM); checkpoint X written", "SIGTERM"), 143)])
def test_interrupt_in_process(tmp_path, monkeypatch, exc, code):
    def stop(*a, **k): raise exc
    monkeypatch.setattr(cli, "train_sae", stop)
    got, _, err = run("train", *S, "--steps", 4, "--out", tmp_path / "r")
    line = one_line(err)
    assert got == code and "--resume" in line, line


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_real_signal_during_training(tmp_path, sig):
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "sae_nb.cli", "train", *S, "--steps", "600", "--checkpoint-every", "2", "--out", str(out)]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / "latest").exists():
            assert p.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.05)
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None: p.kill()
    assert p.returncode == 128 + sig, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    ours = [l for l in err.replace("\r", "\n").splitlines() if l.startswith("sae_nb train:")]
    assert len(ours) == 1 and "--resume" in ours[0] and "checkpoint" in ours[0], err[-2000:]
