"""The fast training paths give the results of the plain ones (issue 14): `train_sae`'s whole run against a textbook
re-implementation of its step, in float64, on a seeded run.

No timing is asserted here (see bench/); these tests fail when a loss term, a gradient, the optimizer, the clipping,
the schedules or a logged statistic of the fast paths differs from the plain arithmetic.
"""
import copy

import pytest
import torch

from sae_nb.sae import SAE, SAEConfig, ARCHITECTURES
from sae_nb.train import TrainConfig, train_sae, lr_factor, l1_factor


def _data(n=96, d_in=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d_in, generator=g, dtype=torch.float64) * 0.7 + 0.2).relu()


def _reference_standard(sae0, X, steps, tc, transcoder_Y=None):
    """The standard SAE's training, written out: ReLU, L1 weighted by decoder norms, MSE, projected decoder gradient,
    global-norm clipping, Adam with the lr schedule, unit rows. Full-batch, so the data order cannot matter."""
    sae = copy.deepcopy(sae0)
    P = dict(sae.named_parameters())
    opt = torch.optim.Adam(P.values(), lr=tc.lr, betas=tc.adam_betas, eps=tc.adam_eps, foreach=False)
    T = steps
    decay = tc.num_decay_steps
    hist = dict(loss=[], mse=[], sparsity=[], l1=[], l0=[])
    Y = X if transcoder_Y is None else transcoder_Y
    for s in range(steps):
        for g in opt.param_groups: g["lr"] = tc.lr * lr_factor(s, T, tc.lr_warmup_steps, decay)
        coef = tc.l1_coefficient * l1_factor(s, tc.num_l1_warmup_steps)
        xc = X - P["b_dec"] if sae.cfg.apply_b_dec_to_input else X
        f = torch.relu(xc @ P["W_enc"] + P["b_enc"])
        x_hat = f @ P["W_dec"] + P["b_dec"]
        mse = ((x_hat - Y) ** 2).sum(-1).mean()
        sparsity = coef * (f * P["W_dec"].norm(dim=1)).sum(-1).mean()
        loss = mse + sparsity
        opt.zero_grad()
        loss.backward()
        with torch.no_grad():
            W, g = P["W_dec"], P["W_dec"].grad
            g -= (g * W).sum(1, keepdim=True) * W / (W * W).sum(1, keepdim=True)
            total = torch.sqrt(sum((p.grad ** 2).sum() for p in P.values()))
            if tc.grad_clip_norm is not None and total > tc.grad_clip_norm:
                for p in P.values(): p.grad *= tc.grad_clip_norm / (total + 1e-6)
        opt.step()
        with torch.no_grad(): P["W_dec"] /= P["W_dec"].norm(dim=1, keepdim=True)
        for k, v in dict(loss=loss, mse=mse, sparsity=sparsity, l1=f.sum(-1).mean(), l0=(f > 0).double().sum(-1).mean()).items():
            hist[k].append(float(v))
    return sae, hist


@pytest.mark.parametrize("kw", [dict(), dict(apply_b_dec_to_input=True)])
def test_standard_train_sae_equals_textbook_step(kw):
    "train_sae (fused step, workspace, fused Adam, cheap statistics) = the plain arithmetic, weights and logged terms, float64."
    X = _data()
    cfg = SAEConfig("standard", d_in=12, d_sae=40, dtype="float64", **kw)
    sae0 = SAE.from_config(cfg, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # off the tied init, so every term and gradient is exercised
        sae0.b_enc.add_(torch.randn(40, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.1)
    steps = 6
    tc = TrainConfig(batch_size=X.shape[0], steps=steps, lr=3e-2, l1_coefficient=0.5, lr_warmup_steps=2, l1_warmup_steps=2,
                     grad_clip_norm=1.0, b_dec_init=None, log_every=1, show_progress=False, device="cpu")
    ref, hist = _reference_standard(sae0, X, steps, tc)
    got, h = train_sae(X.clone(), copy.deepcopy(sae0), tc)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(getattr(got, name).detach(), p.detach(), rtol=1e-9, atol=1e-10, msg=name)
    for k in ("loss", "mse", "sparsity", "l1", "l0"):
        torch.testing.assert_close(torch.tensor(h[k]), torch.tensor(hist[k]), rtol=1e-9, atol=1e-12, msg=k)
    assert min(hist["l0"]) > 0 and max(hist["sparsity"]) > 0 and h["lr"][0] < h["lr"][-1]  # the case exercises the terms


def test_reference_detects_a_wrong_l1_term():
    "The comparison above is sharp: an L1 term off by 1% (or unweighted by the norms) changes the weights past its tolerance."
    X = _data()
    cfg = SAEConfig("standard", d_in=12, d_sae=40, dtype="float64")
    sae0 = SAE.from_config(cfg, generator=torch.Generator().manual_seed(0))
    tc = TrainConfig(batch_size=X.shape[0], steps=4, lr=3e-2, l1_coefficient=0.5, b_dec_init=None, show_progress=False, device="cpu")
    ref, _ = _reference_standard(sae0, X, 4, tc)
    off, _ = _reference_standard(sae0, X, 4, TrainConfig(**{**tc.to_dict(), "l1_coefficient": 0.505, "adam_betas": tc.adam_betas}))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(off.W_enc.detach(), ref.W_enc.detach(), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_features_are_never_negative(arch):
    "The trainer's firing test (`f.amax(0) > 0`) and L1 (`f.sum() / n`) assume f >= 0: true of every architecture, trained or not."
    kw = dict(k=3) if "topk" in arch else {}
    s = SAE.from_config(SAEConfig(arch, d_in=8, d_sae=32, dtype="float64", **kw), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in s.named_parameters(): p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
        if hasattr(s, "threshold"): s.threshold.fill_(-0.3)  # even a negative threshold
    x = torch.randn(50, 8, generator=g, dtype=torch.float64)
    for train in (True, False):
        s.train(train)
        assert (s.training_loss(x, 0.1)["feature_acts"] >= 0).all() and (s.encode(x) >= 0).all()


def test_history_statistics_match_plain_counts_every_arch():
    "The logged l0, l1 and dead fraction of every architecture equal the plain counts over the features (one step, logged)."
    X = _data(64, 8)
    for arch, sparse in [(a, None) for a in ARCHITECTURES] + [(a, True) for a in ARCHITECTURES if "topk" in a]:
        kw = dict(k=3) if "topk" in arch else {}
        cfg = SAEConfig(arch, d_in=8, d_sae=32, dtype="float64", **kw)
        s = SAE.from_config(cfg, generator=torch.Generator().manual_seed(0))
        if sparse: s.sparse_training = True  # the sparse path, which reports its own statistics
        seen = {}
        orig = type(s).training_loss
        def spy(self, *a, **k):
            out = orig(self, *a, **k); seen["f"] = out["feature_acts"].detach().clone(); return out
        type(s).training_loss = spy
        try: _, h = train_sae(X.clone(), s, TrainConfig(batch_size=64, steps=1, b_dec_init=None, show_progress=False, device="cpu",
                                                        dead_feature_window=64))
        finally: type(s).training_loss = orig
        f = seen["f"]
        assert abs(h["l1"][0] - float(f.abs().sum(-1).mean())) < 1e-9, arch
        if arch not in ("batchtopk", "matryoshka_batchtopk"):  # these log the saved (threshold) SAE's L0
            assert abs(h["l0"][0] - float((f != 0).sum(-1).double().mean())) < 1e-12, arch
        assert abs(h["dead_fraction"][0] - float((f == 0).all(0).double().mean())) < 1e-12, arch


def test_nan_input_still_caught():
    "The cheaper finiteness check (a sum) still stops at the first batch holding a NaN or an inf."
    from sae_nb.config import SaeNbError
    for bad in (float("nan"), float("inf"), -float("inf")):
        X = _data(64, 8)
        X[40, 3] = bad
        with pytest.raises(SaeNbError, match="contains NaN or inf"):
            train_sae(X, SAEConfig("standard", d_in=8, d_sae=16, dtype="float64"),
                      TrainConfig(batch_size=32, steps=3, b_dec_init=None, show_progress=False, device="cpu", seed=0))


@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_roundtrip_tiles_equal_the_loop(apply_b_dec):
    "The cache-tiled roundtrip of a standard SAE (tiles smaller than the SAE, ragged edges) = the study's per-feature loop."
    from sae_nb.eval import roundtrip, roundtrip_reference, _relu_encoder, _roundtrip_tiled, _roundtrip_result
    s = SAE.from_config(SAEConfig("standard", d_in=10, d_sae=37, dtype="float64", apply_b_dec_to_input=apply_b_dec),
                        generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in s.parameters(): p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.4)
    ref = roundtrip_reference(s, scale=2.0)
    assert _relu_encoder(s) is not None
    with torch.inference_mode():
        tiled = _roundtrip_result(*_roundtrip_tiled(*_relu_encoder(s), lambda i0, i1: torch.add(s.b_dec, s.W_dec[i0:i1], alpha=2.0), 37, rows=5, cols=7))
    for out in (tiled, roundtrip(s, scale=2.0), roundtrip(s, scale=2.0, chunk_size=4)):
        for k in ref:
            if ref[k].dtype == torch.bool or k == "argmax": assert torch.equal(out[k], ref[k]), k
            else: torch.testing.assert_close(out[k], ref[k], rtol=1e-10, atol=1e-12, msg=k)
    assert 0 < int(ref["self_recovered"].sum()) < 37  # both outcomes occur


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_topk_training_in_the_trainers_workspace_equals_the_dense_path(arch):
    "Several `train_sae` steps of the sparse path (pre-activations written into the trainer's reused buffer) equal the dense path's, in float64."
    X = _data(n=96, d_in=12, seed=3)
    sae0 = SAE.from_config(SAEConfig(arch, 12, 48, k=3, dtype="float64"), generator=torch.Generator().manual_seed(4))
    tc = TrainConfig(batch_size=32, steps=6, lr=1e-2, b_dec_init=None, show_progress=False, log_every=1, seed=0)
    runs = {}
    for sparse in (True, False):
        sae = copy.deepcopy(sae0); sae.sparse_training = sparse
        _, hist = train_sae(X, sae, tc)
        runs[sparse] = (sae, hist)
    (a, ha), (b, hb) = runs[True], runs[False]
    for name, p in a.named_parameters(): torch.testing.assert_close(p, dict(b.named_parameters())[name], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(torch.tensor(ha["mse"]), torch.tensor(hb["mse"]), rtol=1e-9, atol=1e-12)
    assert not torch.equal(a.W_enc, sae0.W_enc)  # it trained
