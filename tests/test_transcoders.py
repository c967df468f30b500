"""Transcoders and skip transcoders (sae_nb.sae, `SAEConfig(transcoder=True, skip=..., d_out=...)`): SAELens folders
both ways (ours -> `sae_lens.SAE.load_from_disk`, SAELens' `Transcoder`/`SkipTranscoder`/`JumpReLU(Skip)Transcoder`
`save_model` -> `SAE.load`), the TopK sparse training path against the dense one, a short Adam run on `training_loss`
that learns a planted linear map + sparse code, and damaged folders / bad configs refused with `SaeNbError`.
The formula and a hand-computed loss are in nbs/04_sae.ipynb ("Transcoders").
Run: `.venv/bin/python -m pytest -q tests/test_transcoders.py`.
"""
import json

import pytest
import torch

from sae_lens import SAE as SLSAE
from sae_lens import (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig, JumpReLUTranscoder, JumpReLUTranscoderConfig,
                      SkipTranscoder, SkipTranscoderConfig, Transcoder, TranscoderConfig)

from sae_nb.config import SaeNbError, load_safetensors_checked
from sae_nb.sae import SAE, SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SAEConfig, _sae_bytes
from test_architectures import _edit_cfg, _edit_weights, perturbed

D_IN, D_OUT, D_SAE = 12, 7, 48
X = torch.randn(3, 5, D_IN, generator=torch.Generator().manual_seed(7))


def close(a, b, eps=1e-5):
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    assert (a - b).abs().max().item() <= eps, (a - b).abs().max().item()


def tc_cfg(arch, skip=False, **kw):
    k = dict(k=4) if arch in ("topk", "batchtopk") else {}
    return SAEConfig(arch, D_IN, D_SAE, transcoder=True, skip=skip, d_out=D_OUT, model_name="gelu-1l",
                     hook_name="blocks.0.ln2.hook_normalized", hook_name_out="blocks.0.hook_mlp_out", **k, **kw)


def ours(arch, skip=False, seed=0, **kw):
    "A small eval-mode transcoder with non-trivial values in every tensor (W_skip included)."
    return perturbed(SAE.from_config(tc_cfg(arch, skip, **kw), generator=torch.Generator().manual_seed(seed)), seed)


def nontrivial(f):
    assert (f != 0).any() and (f == 0).any()


SL_NAME = {("standard", False): ("transcoder", Transcoder), ("standard", True): ("skip_transcoder", SkipTranscoder),
           ("jumprelu", False): ("jumprelu_transcoder", JumpReLUTranscoder),
           ("jumprelu", True): ("jumprelu_skip_transcoder", JumpReLUSkipTranscoder),
           ("batchtopk", False): ("jumprelu_transcoder", JumpReLUTranscoder),
           ("batchtopk", True): ("jumprelu_skip_transcoder", JumpReLUSkipTranscoder)}


@pytest.mark.parametrize("arch,skip", list(SL_NAME))
def test_ours_loads_in_sae_lens(tmp_path, arch, skip):
    sae = ours(arch, skip)
    p = sae.save(tmp_path / "tc")
    d = json.loads((p / SAE_CFG_FILENAME).read_text())
    name, cls = SL_NAME[arch, skip]
    assert (d["architecture"], d["d_in"], d["d_out"], d["apply_b_dec_to_input"]) == (name, D_IN, D_OUT, False)
    assert d["metadata"]["hook_name_out"] == "blocks.0.hook_mlp_out"
    assert ("W_skip" in load_safetensors_checked(p / SAE_WEIGHTS_FILENAME)) == skip
    sl = SLSAE.load_from_disk(str(p))
    assert type(sl) is cls and sl.cfg.d_out == D_OUT
    assert sl.cfg.metadata.hook_name_out == "blocks.0.hook_mlp_out"
    nontrivial(sae.encode(X))
    with torch.no_grad():
        close(sl(X), sae(X)); close(sl.encode(X), sae.encode(X)); close(sl.decode(sae.encode(X)), sae.decode(sae.encode(X)))
    back = SAE.load(p)  # and back: same class, same config, identical tensors
    assert type(back) is type(sae) and back.cfg == sae.cfg
    for n in sae.tensor_names: assert torch.equal(getattr(back, n), getattr(sae, n)), n


def randomise_sl(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, t in m.named_parameters(): t.copy_(torch.randn(t.shape, generator=g) * 0.3 if n != "threshold" else torch.full(t.shape, 0.1))
    return m


@pytest.mark.parametrize("cls,cfg_cls,arch,skip", [(Transcoder, TranscoderConfig, "standard", False),
                                                  (SkipTranscoder, SkipTranscoderConfig, "standard", True),
                                                  (JumpReLUTranscoder, JumpReLUTranscoderConfig, "jumprelu", False),
                                                  (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig, "jumprelu", True)])
def test_sae_lens_folder_loads_here(tmp_path, cls, cfg_cls, arch, skip):
    sl = randomise_sl(cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, apply_b_dec_to_input=False)), seed=3)
    sl.cfg.metadata.hook_name = "blocks.0.ln2.hook_normalized"; sl.cfg.metadata.hook_name_out = "blocks.0.hook_mlp_out"
    sl.save_model(str(tmp_path / "sl"))
    sae = SAE.load(tmp_path / "sl")
    assert (sae.cfg.architecture, sae.cfg.transcoder, sae.cfg.skip, sae.cfg.d_in, sae.cfg.d_out, sae.cfg.out_width) == \
        (arch, True, skip, D_IN, D_OUT, D_OUT)
    assert (sae.cfg.hook_name, sae.cfg.hook_name_out) == ("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out")
    nontrivial(sae.encode(X))
    with torch.no_grad(): close(sae(X), sl(X)); close(sae.encode(X), sl.encode(X))
    sae.save(tmp_path / "again")  # and out again, loadable by SAELens with the same outputs
    with torch.no_grad(): close(SLSAE.load_from_disk(str(tmp_path / "again"))(X), sl(X))


@pytest.mark.parametrize("skip", [False, True])
def test_topk_transcoder_roundtrip(tmp_path, skip):
    "SAELens 6.x has no TopK transcoder class: ours saves as `topk[_skip]_transcoder`, reads back here, and SAELens refuses it."
    sae = ours("topk", skip)
    p = sae.save(tmp_path / "tk")
    d = json.loads((p / SAE_CFG_FILENAME).read_text())
    assert (d["architecture"], d["k"], d["d_out"]) == ("topk_skip_transcoder" if skip else "topk_transcoder", 4, D_OUT)
    back = SAE.load(p)
    assert back.cfg == sae.cfg
    torch.testing.assert_close(back(X), sae(X), rtol=0, atol=0)
    assert (back.encode(X) != 0).sum(-1).max() <= 4
    with pytest.raises(Exception): SLSAE.load_from_disk(str(p))


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("skip", [False, True])
def test_sparse_path_matches_dense_for_transcoders(arch, skip):
    "The sparse TopK/BatchTopK training path on a transcoder: loss terms and every gradient equal the dense path's (AuxK included)."
    x = torch.randn(40, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randn(40, D_OUT, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    dead = torch.zeros(D_SAE, dtype=torch.bool); dead[::3] = True
    outs = []
    for sparse in (False, True):
        sae = ours(arch, skip, dtype="float64").train()
        sae.sparse_training = sparse
        out = sae.training_loss(x, 0.0, dead, target=y)
        out["loss"].backward()
        outs.append((out, {n: p.grad.clone() for n, p in sae.named_parameters()}))
    (od, gd), (os_, gs) = outs
    assert od["aux"] > 0
    for k in ("loss", "mse", "aux", "x_hat", "feature_acts"): close(od[k], os_[k], 1e-10)
    assert od["x_hat"].shape == (40, D_OUT)
    assert gd.keys() == gs.keys() and (("W_skip" in gd) == skip)
    for n in gd: close(gd[n], gs[n], 1e-10)


@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_training_learns_planted_map(arch):
    "Adam on `training_loss` alone: a skip transcoder learns y = A x + z D_out (z a sparse code with x = z D_in), beating the best linear map."
    g = torch.Generator().manual_seed(0)
    d_in, d_out, n_feat = 10, 6, 24  # more features than d_in: the sparse part of y is not a linear function of x
    D_in = torch.randn(n_feat, d_in, generator=g); D_in /= D_in.norm(dim=1, keepdim=True)
    D_out = torch.randn(n_feat, d_out, generator=g)
    A = torch.randn(d_out, d_in, generator=g) * 0.5

    def batch(n=256):
        z = (torch.rand(n, n_feat, generator=g) < 0.08) * torch.rand(n, n_feat, generator=g) * 3
        x = z @ D_in
        return x, z @ D_out + x @ A.T
    k = dict(k=4) if arch == "topk" else {}
    sae = SAE.from_config(SAEConfig(arch, d_in, 48, transcoder=True, skip=True, d_out=d_out, **k),
                          generator=torch.Generator().manual_seed(1)).train()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    xv, yv = batch(2048)
    var = (yv - yv.mean(0)).pow(2).sum()
    fvu = lambda: ((sae(xv) - yv).pow(2).sum() / var).item()
    xa = torch.cat([xv, torch.ones(len(xv), 1)], 1)
    linear_fvu = ((xa @ torch.linalg.lstsq(xa, yv).solution - yv).pow(2).sum() / var).item()  # best affine map: about 0.35
    start = fvu()
    for step in range(400):
        x, y = batch()
        out = sae.training_loss(x, 1e-3, torch.zeros(48, dtype=torch.bool), target=y)
        opt.zero_grad(); out["loss"].backward()
        sae.on_before_optimizer_step(); opt.step(); sae.on_after_optimizer_step()
    end = fvu()
    assert start > 0.5 and end < 0.2 and end < 0.5 * linear_fvu, (start, end, linear_fvu)
    assert sae.W_skip.abs().sum() > 0  # the skip map was trained (it starts at 0)


def test_damaged_folders(tmp_path):
    p = ours("standard", True).save(tmp_path / "skip")
    _edit_weights(p, lambda w: w.pop("W_skip"))
    with pytest.raises(SaeNbError, match=r"missing tensor\(s\) \['W_skip'\] for a standard skip transcoder"): SAE.load(p)
    p = ours("standard", True).save(tmp_path / "d_out")
    _edit_cfg(p, lambda d: d.update(d_out=D_OUT + 1))
    with pytest.raises(SaeNbError, match=rf"'W_dec' has shape \({D_SAE}, {D_OUT}\) but cfg.json \(d_in={D_IN}, d_sae={D_SAE}, d_out={D_OUT + 1}\)"):
        SAE.load(p)
    p = ours("jumprelu").save(tmp_path / "no_d_out")
    _edit_cfg(p, lambda d: d.pop("d_out"))
    with pytest.raises(SaeNbError, match="missing field 'd_out'"): SAE.load(p)
    p = ours("standard").save(tmp_path / "extra")  # a W_skip in a plain transcoder's file
    _edit_weights(p, lambda w: w.update(W_skip=torch.zeros(D_OUT, D_IN)))
    with pytest.raises(SaeNbError, match=r"unexpected tensor\(s\) \['W_skip'\]"): SAE.load(p)
    p = ours("standard", True).save(tmp_path / "skip_shape")
    _edit_weights(p, lambda w: w.update(W_skip=w["W_skip"].T.contiguous()))
    with pytest.raises(SaeNbError, match=r"'W_skip' has shape"): SAE.load(p)
    p = ours("standard").save(tmp_path / "gated")
    _edit_cfg(p, lambda d: d.update(architecture="gated_transcoder"))
    with pytest.raises(SaeNbError, match="transcoder architecture 'gated_transcoder' is not supported"): SAE.load(p)


def test_config_and_loss_errors():
    with pytest.raises(SaeNbError, match=r"\['skip'\] only apply to transcoders"): SAEConfig("standard", 4, 8, skip=True)
    with pytest.raises(SaeNbError, match=r"\['d_out', 'hook_name_out'\] only apply"): SAEConfig("standard", 4, 8, d_out=3, hook_name_out="h")
    with pytest.raises(SaeNbError, match="transcoder's architecture must be one of"): SAEConfig("gated", 4, 8, transcoder=True)
    with pytest.raises(SaeNbError, match="d_out=0"): SAEConfig("standard", 4, 8, transcoder=True, d_out=0)
    with pytest.raises(SaeNbError, match="not hook_z heads"): SAEConfig("standard", 4, 8, transcoder=True, hook_name="blocks.0.attn.hook_z")
    c = SAEConfig("standard", 4, 8, transcoder=True)
    assert (c.d_out, c.out_width, c.apply_b_dec_to_input) == (4, 4, False)  # None: d_in; the encoder reads x as it is
    assert SAEConfig("standard", 4, 8).out_width == 4 and SAEConfig("standard", 4, 8).d_out is None
    assert SAEConfig.from_dict(tc_cfg("topk", True).to_dict()) == tc_cfg("topk", True)
    t = SAE.from_config(tc_cfg("standard"))
    x = torch.randn(5, D_IN)
    with pytest.raises(SaeNbError, match="needs target="): t.training_loss(x, 1.0)
    with pytest.raises(SaeNbError, match=rf"target has shape \(5, {D_IN}\) but needs \(5, {D_OUT}\)"): t.training_loss(x, 1.0, target=x)
    s = SAE.from_config(SAEConfig("topk", D_IN, D_SAE, k=2))
    with pytest.raises(SaeNbError, match="target= is for transcoders"): s.training_loss(x, 1.0, target=x)
    g = SAE.from_config(SAEConfig("gated", D_IN, D_SAE))
    with pytest.raises(SaeNbError, match="target= is for transcoders"): g.training_loss(x, 1.0, target=x)


def test_memory_estimate_counts_W_skip():
    for arch in ("standard", "topk", "batchtopk", "jumprelu"):
        for skip in (False, True):
            c = tc_cfg(arch, skip, dtype="float64")
            allocated = sum(t.numel() * t.element_size() for t in SAE.from_config(c).state_dict().values())
            assert allocated <= _sae_bytes(c)[1] < allocated + D_SAE * 8 + 1, (arch, skip, allocated, _sae_bytes(c))
    big = SAEConfig("standard", 1000, 1000, transcoder=True, d_out=2000)
    assert _sae_bytes(SAEConfig("standard", 1000, 1000, transcoder=True, d_out=2000, skip=True))[1] - _sae_bytes(big)[1] == 2000 * 1000 * 4
