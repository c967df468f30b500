"""The two newer architectures, `matryoshka_batchtopk` and `gated` (sae_nb.sae): SAELens folders both ways (ours ->
`sae_lens.SAE.load_from_disk`, SAELens' `save_model` / `save_inference_model` -> `SAE.load`), a short `train_sae` run
each whose saved folder reloads, and damaged folders (missing tensors, bad `matryoshka_widths`) refused with
`SaeNbError`. Their formulas and hand-computed losses are tested in nbs/04_sae.ipynb.
Run: `.venv/bin/python -m pytest -q tests/test_architectures.py`.
"""
import json
import warnings

import pytest
import torch

import sae_lens
from sae_lens import GatedSAE as SLGated, GatedSAEConfig, GatedTrainingSAE, GatedTrainingSAEConfig
from sae_lens import JumpReLUSAE as SLJumpReLU
from sae_lens import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig

from sae_nb.config import SaeNbError, load_safetensors_checked, save_safetensors_atomic
from sae_nb.sae import SAE, SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, GatedSAE, MatryoshkaBatchTopKSAE, SAEConfig
from sae_nb.train import TrainConfig, train_sae
from synthetic import sparse_activations

WIDTHS = [4, 12, 32]


def close(a, b, eps=1e-5):
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    assert (a - b).abs().max().item() <= eps, (a - b).abs().max().item()


def ours(arch, seed=0, **kw):
    "A small eval-mode SAE of `arch` with non-trivial values in every tensor."
    extra = dict(k=3, matryoshka_widths=WIDTHS) if arch == "matryoshka_batchtopk" else {}
    sae = SAE.from_config(SAEConfig(arch, 16, 32, hook_name="blocks.0.mlp.hook_post", model_name="gelu-1l", **extra, **kw),
                          generator=torch.Generator().manual_seed(seed))
    return perturbed(sae, seed)


def perturbed(sae, seed=0):
    "`sae` in eval mode with non-trivial values in every tensor: thresholds 0.15, the rest (W_dec aside) moved by N(0, 0.2^2)."
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n in sae.tensor_names:
            t = getattr(sae, n)
            if n == "threshold": t.fill_(0.15)
            elif n != "W_dec": t.add_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.2)
    return sae.eval()


def randomise_sl(m, seed=0):
    "Random values for every SAELens tensor; decoder rows of random (non-unit) norms."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, t in m.named_parameters(): t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    return m


def nontrivial(f):
    assert (f != 0).any() and (f == 0).any()


X = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(7))


# --- sae_nb -> SAELens ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, sl_class", [("gated", SLGated), ("matryoshka_batchtopk", SLJumpReLU)])
def test_ours_loads_in_saelens_with_equal_encode_and_decode(tmp_path, arch, sl_class):
    sae = ours(arch)
    theirs = sae_lens.SAE.load_from_disk(sae.save(tmp_path / arch))
    assert type(theirs) is sl_class
    eps = 1e-5 if arch == "gated" else 1e-6  # gated: SAELens forms W_enc * exp(r_mag) before its GEMM, sae_nb scales after
    with torch.no_grad():
        f = sae.encode(X)
        nontrivial(f)
        close(theirs.encode(X), f, eps)
        close(theirs.decode(f), sae.decode(f), 1e-6)
        close(theirs(X), sae(X), eps)
    cfg = json.loads((tmp_path / arch / SAE_CFG_FILENAME).read_text())
    if arch == "matryoshka_batchtopk":  # as SAELens' MatryoshkaBatchTopKTrainingSAE.save_inference_model writes it
        assert cfg["architecture"] == "jumprelu" and cfg["metadata"]["training_architecture"] == "matryoshka_batchtopk"
        assert cfg["metadata"]["training_architecture_details"]["matryoshka_widths"] == WIDTHS
    else:
        assert cfg["architecture"] == "gated"
        assert sorted(load_safetensors_checked(tmp_path / arch / SAE_WEIGHTS_FILENAME)) == ["W_dec", "W_enc", "b_dec", "b_gate", "b_mag", "r_mag"]


@pytest.mark.parametrize("arch", ["gated", "matryoshka_batchtopk"])
def test_saelens_resave_of_our_folder_loads_back_as_the_same_architecture(tmp_path, arch):
    "ours -> SAELens -> SAELens' save_model -> ours: the architecture (and Matryoshka's widths and k) survive the trip."
    sae = ours(arch, seed=3)
    theirs = sae_lens.SAE.load_from_disk(sae.save(tmp_path / "a"))
    theirs.save_model(tmp_path / "b")
    back = SAE.load(tmp_path / "b")
    assert type(back) is type(sae)
    if arch == "matryoshka_batchtopk": assert (back.cfg.k, back.cfg.matryoshka_widths) == (3, WIDTHS)
    with torch.no_grad():
        close(back.encode(X), sae.encode(X), 1e-5)
        close(back(X), sae(X), 1e-5)


# --- SAELens -> sae_nb ---------------------------------------------------------------------------------------------
def test_saelens_gated_folders_load_with_equal_outputs(tmp_path):
    inference = randomise_sl(SLGated(GatedSAEConfig(d_in=16, d_sae=32)), seed=1)
    training = randomise_sl(GatedTrainingSAE(GatedTrainingSAEConfig(d_in=16, d_sae=32)), seed=2)
    inference.save_model(tmp_path / "inf")
    training.save_model(tmp_path / "train")
    training.save_inference_model(tmp_path / "train_inf")
    for name, m in (("inf", inference), ("train", training), ("train_inf", training)):
        sae = SAE.load(tmp_path / name)
        assert type(sae) is GatedSAE
        with torch.no_grad():
            nontrivial(sae.encode(X))
            close(sae.encode(X), m.encode(X), 1e-5)
            close(sae.decode(sae.encode(X)), m.decode(m.encode(X)), 1e-5)
            close(sae(X), m(X), 1e-5)


def test_saelens_matryoshka_folders_load_with_equal_outputs(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(d_in=16, d_sae=32, k=3, matryoshka_widths=list(WIDTHS)))
    randomise_sl(m, seed=3).topk_threshold.fill_(0.4)
    assert m.cfg.rescale_acts_by_decoder_norm  # its training folder needs the decoder-norm fold on load
    m.save_model(tmp_path / "train")
    m.save_inference_model(tmp_path / "inf")
    reference = sae_lens.SAE.load_from_disk(tmp_path / "inf")
    for name in ("train", "inf"):
        sae = SAE.load(tmp_path / name)
        assert type(sae) is MatryoshkaBatchTopKSAE and (sae.cfg.k, sae.cfg.matryoshka_widths) == (3, WIDTHS)
        with torch.no_grad():
            nontrivial(sae.encode(X))
            close(sae.encode(X), reference.encode(X), 1e-5)
            close(sae(X), reference(X), 1e-5)


# --- training -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gated", "matryoshka_batchtopk"])
def test_short_training_run_lowers_the_loss_and_its_folder_reloads(tmp_path, arch):
    data = sparse_activations(n_rows=4096, d_in=16, n_features=24, p_active=0.1, seed=0)
    extra = dict(k=3, matryoshka_widths=[8, 16, 64]) if arch == "matryoshka_batchtopk" else {}
    tc = TrainConfig(batch_size=128, steps=80, lr=5e-3, lr_warmup_steps=5, l1_coefficient=0.05, log_every=10, seed=0,
                     out_dir=tmp_path / "run", device="cpu", show_progress=False, b_dec_init="mean")
    sae, history = train_sae(data, SAEConfig(arch, 16, 64, **extra), tc)
    loss = history["loss"]
    assert all(torch.isfinite(torch.tensor(loss))), loss
    assert loss[-1] < 0.6 * loss[0], loss  # it learns
    if arch == "gated": assert history["aux"][-1] > 0  # the gate path's reconstruction term is part of the loss
    back = SAE.load(tmp_path / "run" / "sae")
    assert type(back) is type(sae) and back.cfg.architecture == arch
    if arch == "matryoshka_batchtopk": assert back.cfg.matryoshka_widths == [8, 16, 64]
    sae.eval()
    with torch.no_grad():
        x = data[:256]
        nontrivial(back.encode(x))
        close(back.encode(x), sae.encode(x), 1e-6)
        close(back(x), sae(x), 1e-6)
        ev = 1 - (back(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        assert ev > 0.5, ev


# --- damaged folders ------------------------------------------------------------------------------------------------
def _edit_weights(folder, fn):
    w = load_safetensors_checked(folder / SAE_WEIGHTS_FILENAME)
    fn(w)
    save_safetensors_atomic(w, folder / SAE_WEIGHTS_FILENAME)


def _edit_cfg(folder, fn):
    d = json.loads((folder / SAE_CFG_FILENAME).read_text())
    fn(d)
    (folder / SAE_CFG_FILENAME).write_text(json.dumps(d))


@pytest.mark.parametrize("arch, tensor", [("gated", "r_mag"), ("gated", "b_gate"), ("matryoshka_batchtopk", "threshold"),
                                          ("matryoshka_batchtopk", "b_enc")])
def test_missing_tensor_is_refused(tmp_path, arch, tensor):
    folder = ours(arch).save(tmp_path / "s")
    _edit_weights(folder, lambda w: w.pop(tensor))
    with pytest.raises(SaeNbError, match=rf"missing tensor\(s\) \['{tensor}'\] for a {arch} SAE"):
        SAE.load(folder)


def test_gated_folder_with_a_b_enc_or_a_wrong_shape_is_refused(tmp_path):
    folder = ours("gated").save(tmp_path / "s")
    _edit_weights(folder, lambda w: w.update(b_enc=torch.zeros(32)))
    with pytest.raises(SaeNbError, match=r"unexpected tensor\(s\) \['b_enc'\] for a gated SAE"):
        SAE.load(folder)
    _edit_weights(folder, lambda w: (w.pop("b_enc"), w.update(b_mag=torch.zeros(31))))
    with pytest.raises(SaeNbError, match=r"tensor 'b_mag' has shape \(31,\)"):
        SAE.load(folder)


BAD_WIDTHS = [([12, 4, 32], "strictly increasing"), ([4, 12], "end with d_sae=32"), ([0, 32], ">= 1"), ([], "non-empty list"),
              ("4,12,32", "integers"), ([4.5, 32], "integers"), ([4, [12], 32], "integers"), ({"a": 1}, "integers"),
              ([4, 12, 32, 64], "end with d_sae=32"), ([10**30, 32], "strictly increasing")]


@pytest.mark.parametrize("widths, message", BAD_WIDTHS)
def test_wrong_widths_in_an_inference_folder_are_refused(tmp_path, widths, message):
    folder = ours("matryoshka_batchtopk").save(tmp_path / "s")
    _edit_cfg(folder, lambda d: d["metadata"]["training_architecture_details"].update(matryoshka_widths=widths))
    with pytest.raises(SaeNbError, match=message) as e:
        SAE.load(folder)
    assert str(folder / SAE_CFG_FILENAME) in str(e.value)


@pytest.mark.parametrize("widths, message", BAD_WIDTHS[:3] + [(None, "without 'matryoshka_widths'")])
def test_wrong_widths_in_a_saelens_training_folder_are_refused(tmp_path, widths, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(d_in=16, d_sae=32, k=3, matryoshka_widths=list(WIDTHS)))
    m.save_model(tmp_path / "s")
    _edit_cfg(tmp_path / "s", lambda d: (d.update(matryoshka_widths=widths), d["metadata"]["training_architecture_details"].pop("matryoshka_widths")))
    with pytest.raises(SaeNbError, match=message):
        SAE.load(tmp_path / "s")


def test_inference_folder_without_widths_loads_as_plain_jumprelu(tmp_path):
    "A jumprelu folder whose details lack the widths is not guessed into a Matryoshka SAE: it loads as what it says, with the same outputs."
    sae = ours("matryoshka_batchtopk")
    folder = sae.save(tmp_path / "s")
    _edit_cfg(folder, lambda d: d["metadata"]["training_architecture_details"].pop("matryoshka_widths"))
    back = SAE.load(folder)
    assert back.cfg.architecture == "jumprelu"
    with torch.no_grad(): close(back(X), sae(X), 1e-6)


def test_widths_on_another_architecture_are_refused():
    with pytest.raises(SaeNbError, match="only for architecture='matryoshka_batchtopk'"):
        SAEConfig("gated", 16, 32, matryoshka_widths=[8, 32])
