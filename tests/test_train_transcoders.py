"Training transcoders with train_sae / train_saes: paired data of every kind, resume exactness, and the refusals."
import os, signal, tempfile
from pathlib import Path

import pytest
import torch

from sae_nb.config import SaeNbError, seed_everything
from sae_nb.sae import SAE, SAEConfig
from sae_nb.train import TrainConfig, train_sae, train_saes, latest_checkpoint

D_IN, D_OUT, N_FEAT = 24, 16, 48
SMALL = dict(batch_size=128, steps=60, lr=1e-2, l1_coefficient=0.02, log_every=10, lr_warmup_steps=5,
             dead_feature_window=128 * 20, show_progress=False, device="cpu")


def planted_pairs(n=4096, seed=0, linear=0.5):
    "X = c @ D_in, Y = c @ D_out + linear * X @ A.T: a sparse code read from X, and a linear map a skip transcoder can take."
    g = torch.Generator().manual_seed(seed)
    d_in = torch.randn(N_FEAT, D_IN, generator=g); d_in /= d_in.norm(dim=1, keepdim=True)
    d_out = torch.randn(N_FEAT, D_OUT, generator=g); d_out /= d_out.norm(dim=1, keepdim=True)
    a = torch.randn(D_OUT, D_IN, generator=g) / D_IN ** 0.5
    c = (torch.rand(n, N_FEAT, generator=g) < 0.05) * torch.rand(n, N_FEAT, generator=g) * 3
    x = c @ d_in
    return x, c @ d_out + linear * x @ a.T


def tcfg(skip=False, arch="standard", **kw):
    return SAEConfig(architecture=arch, d_in=D_IN, d_sae=4 * N_FEAT, transcoder=True, skip=skip, d_out=D_OUT,
                     hook_name="in", hook_name_out="out", **kw)


def rel_mse(sae, X, Y):
    "MSE of the prediction over the MSE of a zero predictor (1.0: no better than predicting 0)."
    with torch.no_grad(): return float((sae(X) - Y).pow(2).mean() / Y.pow(2).mean())


@pytest.mark.parametrize("skip", [False, True])
def test_transcoder_learns_planted_map(skip):
    X, Y = planted_pairs()
    sae, h = train_sae((X, Y), tcfg(skip), TrainConfig(**SMALL))
    assert sae.cfg.transcoder and sae.cfg.skip == skip
    assert rel_mse(sae, X, Y) < 0.3, rel_mse(sae, X, Y)
    assert h["explained_variance"][-1] > 0.6, h["explained_variance"]  # of the target Y, not of X
    # the logged mse is the target's: about the direct one
    assert h["mse"][-1] < 0.5 * float(Y.pow(2).sum(-1).mean())


def test_iterable_of_pairs_and_tuple_agree_in_kind():
    X, Y = planted_pairs(n=2048)
    batches = [(x, y) for x, y in zip(X.split(128), Y.split(128))]
    sae, h = train_sae(batches, tcfg(), TrainConfig(**{**SMALL, "steps": 30}))
    assert h["step"][-1] == 30 and rel_mse(sae, X, Y) < 0.6


def test_b_dec_init_from_targets():
    X, Y = planted_pairs(n=1024)
    Y = Y + 5.0  # a target offset the inputs do not have
    sae, _ = train_sae((X, Y), tcfg(), TrainConfig(**{**SMALL, "steps": 1, "lr": 1e-9, "b_dec_init": "mean"}))
    # b_dec is the mean of the first batch of TARGETS (about 5), not of the inputs (about 0)
    assert float(sae.b_dec.detach().mean()) > 4.0, sae.b_dec


def interrupt_after(sae, n):
    count, original = [0], sae.on_after_optimizer_step
    def hooked():
        original(); count[0] += 1
        if count[0] == n: os.kill(os.getpid(), signal.SIGINT)
    sae.on_after_optimizer_step = hooked
    return sae


@pytest.mark.parametrize("arch,skip", [("standard", False), ("topk", True)])
def test_resume_is_exact_on_tensor_pairs(tmp_path, arch, skip):
    X, Y = planted_pairs(n=1024)  # 8 batches an epoch: the run crosses epochs (the pairs reshuffled together)
    cfg = tcfg(skip, arch, **({"k": 4} if arch == "topk" else {}))
    tc = dict(SMALL, steps=30, checkpoint_every=10, dead_feature_window=4 * 128)
    straight, h1 = train_sae((X.clone(), Y.clone()), cfg, TrainConfig(**tc, out_dir=tmp_path / "straight"))
    sae = interrupt_after(SAE.from_config(cfg, generator=seed_everything(0)), 13)
    with pytest.raises(KeyboardInterrupt, match="interrupted after step 13"):
        train_sae((X.clone(), Y.clone()), sae, TrainConfig(**tc, out_dir=tmp_path / "resumed"))
    assert latest_checkpoint(tmp_path / "resumed").name == "step_13"
    resumed, h2 = train_sae((X.clone(), Y.clone()), cfg, TrainConfig(**tc, out_dir=tmp_path / "resumed", resume=True))
    for k, v in straight.state_dict().items(): assert torch.equal(v, resumed.state_dict()[k]), k
    assert {k: v for k, v in h1.items() if k != "elapsed_s"} == {k: v for k, v in h2.items() if k != "elapsed_s"}
    loaded = SAE.load(tmp_path / "resumed" / "sae")
    assert loaded.cfg.transcoder and loaded.cfg.skip == skip and loaded.cfg.d_out == D_OUT


def test_refusals(tmp_path):
    X, Y = planted_pairs(n=512)
    sae_cfg = SAEConfig(architecture="standard", d_in=D_IN, d_sae=32)
    tc = TrainConfig(**{**SMALL, "steps": 5})
    # an SAE given pairs: a tuple (X, Y), an iterable of pairs
    with pytest.raises(SaeNbError, match=r"reconstructs its input.*transcoder=True"): train_sae((X, X[:, :D_IN]), sae_cfg, tc)
    with pytest.raises(SaeNbError, match=r"Step 1: .*pair.*SAE reconstructs its input"):
        train_sae([(x, y) for x, y in zip(X.split(128), Y.split(128))], sae_cfg, tc)
    # a transcoder given plain data: a tensor, an iterable of tensors
    with pytest.raises(SaeNbError, match=r"transcoder trains on \(input, target\) pairs.*hook_name_out"): train_sae(X, tcfg(), tc)
    with pytest.raises(SaeNbError, match=r"Step 1: .*plain batch.*transcoder trains on \(x, y\) pairs"): train_sae(list(X.split(128)), tcfg(), tc)
    # wrong widths / rows, at the start and mid-run
    with pytest.raises(SaeNbError, match=r"Y has shape .* must be \[N, 16\]"): train_sae((X, X), tcfg(), tc)
    with pytest.raises(SaeNbError, match=r"X has 512 rows but Y has 256"): train_sae((X, Y[:256]), tcfg(), tc)
    bad = [(x, y) for x, y in zip(X.split(128), Y.split(128))]
    bad[2] = (bad[2][0], bad[2][1][:, :3])
    with pytest.raises(SaeNbError, match=r"Step 3: .*pair of \(128, 24\) and \(128, 3\)"): train_sae(bad, tcfg(), tc)
    # NaN in the target is caught as in the input
    Yn = Y.clone(); Yn[200, 0] = float("nan")
    with pytest.raises(SaeNbError, match="NaN or inf"): train_sae((X, Yn), tcfg(), TrainConfig(**{**SMALL, "steps": 4, "b_dec_init": None}))
    # normalize_activations and resampling: not for transcoders (yet)
    with pytest.raises(SaeNbError, match="normalize_activations.*not supported for transcoders"):
        train_sae((X, Y), tcfg(normalize_activations="expected_average_only_in"), tc)
    with pytest.raises(SaeNbError, match="resample_every.*not transcoders"):
        train_sae((X, Y), tcfg(), TrainConfig(**{**SMALL, "steps": 5, "resample_every": 2}))
    # a set mixing an SAE and a transcoder
    with pytest.raises(SaeNbError, match="separate sets"): train_saes((X, Y), [tcfg(), sae_cfg], tc)
    # nothing was written by a refused run
    out = tmp_path / "refused"
    with pytest.raises(SaeNbError): train_sae(X, tcfg(), TrainConfig(**{**SMALL, "steps": 5, "out_dir": out}))
    assert not (out / "checkpoints").exists() and not (out / "sae").exists()


@pytest.fixture(scope="module")
def glass():
    from sae_nb.models import load_model
    from sae_nb.data import load_corpus, tokenize_corpus
    model = load_model("glassllm-en", device="cpu")
    tokens = tokenize_corpus(load_corpus("pydoc", max_docs=50), model, context_size=32, max_tokens=32 * 48, show_progress=False)
    return model, tokens


def test_train_saes_transcoders_from_one_paired_store(glass, tmp_path):
    from sae_nb.activations import ActivationStore
    model, tokens = glass
    hin, hout = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
    assert hin in model.hook_dict and hout in model.hook_dict
    store = ActivationStore(model, tokens, hin, batch_size=64, show_progress=False, hook_name_out=hout)
    assert store.paired
    fetched = [0]
    original = store.__next__
    class Counting:  # counts the pairs the trainer draws (an ActivationStore is its own iterator)
        paired, d_in, d_out, hook_name_out, batch_size = store.paired, store.d_in, store.d_out, store.hook_name_out, store.batch_size
        def __iter__(self): return self
        def __next__(self): fetched[0] += 1; return original()
    d = model.cfg.d_model
    cfgs = [(SAEConfig(architecture="topk", d_in=d, d_sae=2 * d, k=8, transcoder=True, d_out=d, hook_name=hin, hook_name_out=hout), {"name": "tc"}),
            (SAEConfig(architecture="standard", d_in=d, d_sae=2 * d, transcoder=True, skip=True, d_out=d, hook_name=hin, hook_name_out=hout), {"name": "skip_tc"})]
    steps = 20
    out = train_saes(Counting(), cfgs, TrainConfig(**{**SMALL, "batch_size": 64, "steps": steps, "lr": 1e-3, "out_dir": tmp_path / "sweep"}))
    assert fetched[0] == steps  # each pair fetched once for both transcoders
    for (sae, h), name in zip(out, ("tc", "skip_tc")):
        assert h["step"][-1] == steps and all(v == v for v in h["loss"])
        assert h["explained_variance"][-1] > h["explained_variance"][0], (name, h["explained_variance"])
        assert SAE.load(tmp_path / "sweep" / name / "sae").cfg.hook_name_out == hout
    # the store itself (not wrapped) is accepted too, and an SAE given it is refused before training
    train_sae(store, cfgs[0][0], TrainConfig(**{**SMALL, "batch_size": 64, "steps": 2}))
    with pytest.raises(SaeNbError, match="store gives \\(x, y\\) pairs"):
        train_sae(store, SAEConfig(architecture="standard", d_in=d, d_sae=2 * d), TrainConfig(**{**SMALL, "batch_size": 64, "steps": 2}))


# ---- the CLI: sae_nb train --hook-out HOOK [--skip] ----

TINY = ["--model", "glassllm-en", "--batch-size", 64, "--context-size", 32, "--eval-windows", 2, "--no-report", "--device", "cpu"]
HIN, HOUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"


from test_edges_cli import run as cli_run  # noqa: E402 (one in-process CLI runner for the tests)


@pytest.fixture(scope="module")
def tc_run(tmp_path_factory):
    "A finished 20-step skip-transcoder run from the CLI."
    out = tmp_path_factory.mktemp("runs") / "tc"
    code, stdout, err = cli_run("train", *TINY, "--hook", HIN, "--hook-out", HOUT, "--skip", "--steps", 20, "--checkpoint-every", 10, "--out", out)
    assert code == 0, err[-3000:]
    return out, stdout


def test_cli_trains_a_transcoder(tc_run):
    import json
    out, stdout = tc_run
    sae = SAE.load(out / "sae")
    assert sae.cfg.transcoder and sae.cfg.skip and sae.cfg.hook_name == HIN and sae.cfg.hook_name_out == HOUT
    assert sae.cfg.d_out == sae.cfg.d_in  # ln2 output and mlp_out are both d_model wide
    m = json.loads((out / "metrics.json").read_text())
    assert m["transcoder"] is True and m["skip"] is True and m["hook_out"] == HOUT and m["d_out"] == sae.cfg.d_out
    assert "transcoder to " + HOUT in stdout
    # the encoder reads --hook, so feature density is measured as for an SAE, over the training stream
    assert m["density_n_tokens"] > 0 and 0 <= m["dead_fraction"] <= 1 and "feature density:" in stdout


def test_cli_transcoder_resume_keeps_its_hooks(tc_run, monkeypatch):
    import sae_nb.cli as cli
    out, _ = tc_run
    # no options: --hook, --hook-out and --skip come from the run itself
    code, stdout, err = cli_run("train", "--out", out, "--resume", "--no-report", "--device", "cpu")
    assert code == 0, err[-3000:]
    assert f"skip standard transcoder to {HOUT}" in stdout, stdout
    # another output hook, or dropping --skip's effect by asking for a plain SAE run: refused before any work
    def boom(*a, **k): raise AssertionError("long work started before the refusal")
    for n in ("load_model", "tokenize_corpus", "train_sae"): monkeypatch.setattr(cli, n, boom)
    code, _, err = cli_run("train", *TINY, "--out", out, "--resume", "--hook-out", "blocks.0.hook_attn_out")
    assert code == 2 and "Cannot resume" in err and "--hook-out blocks.0.hook_attn_out" in err and HOUT in err, err[-2000:]


def test_cli_default_folder_names_the_output_hook(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli_run("train", *TINY, "--hook", HIN, "--hook-out", HOUT, "--architecture", "topk", "--k", 8, "--steps", 4)
    assert code == 0, err[-3000:]
    (folder,) = (tmp_path / "runs").iterdir()
    assert HOUT in folder.name and "transcoder" in folder.name and "skip" not in folder.name, folder.name
    assert SAE.load(folder / "sae").cfg.architecture == "topk"


def test_cli_skip_needs_hook_out(tmp_path):
    code, _, err = cli_run("train", *TINY, "--skip", "--steps", 2, "--out", tmp_path / "x")
    assert code == 2 and "--skip is for transcoders" in err, err[-2000:]


def test_cli_transcoder_report_has_density_and_no_roundtrip(tmp_path):
    argv = [a for a in TINY if a != "--no-report"]
    code, _, err = cli_run("train", *argv, "--hook", HIN, "--hook-out", HOUT, "--steps", 4, "--out", tmp_path / "r")
    assert code == 0, err[-3000:]
    page = (tmp_path / "r" / "report.html").read_text()
    assert "transcoder " + HIN + " -&gt; " + HOUT in page and "Feature density" in page
    assert not (tmp_path / "r" / "saebench_core.json").exists()


def test_memory_estimate_counts_the_output_width_and_w_skip():
    from sae_nb.cli import _training_bytes
    sae_bytes = _training_bytes(64, [256], 128)
    wide_out = _training_bytes(64, [256], 128, d_out=4096)
    # W_dec [256, 4096] and b_dec with grads + Adam (4 copies), targets in the batch (3 copies) and the buffer (16 rows)
    extra = 4 * (4 * (256 * (4096 - 64) + (4096 - 64)) + 3 * 128 * 4096 + 16 * 128 * 4096)
    assert wide_out - sae_bytes == extra
    assert _training_bytes(64, [256], 128, d_out=4096, skip=True) - wide_out == 4 * 4 * 64 * 4096
