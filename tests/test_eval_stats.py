"""Statistics of the evaluation (sae_nb.eval): the window-level standard errors are right on synthetic data where
tokens within a window are correlated (a per-token SE would be too small), they shrink with more windows,
`feature_density` streams in constant memory with the same counts whatever the batch size (attention hooks too) and
refuses before any work, and the SAEBench `core` JSON is strict JSON (NaN as null) with SAEBench's key names.
The hand-computed cases are in nbs/06_eval.ipynb; the frontier figure's structure in nbs/07_plots.ipynb.
Run: `.venv/bin/python -m pytest -q tests/test_eval_stats.py`.
"""
import json, math

import pytest
import torch

from sae_nb.config import SaeNbError
from sae_nb.data import load_corpus, tokenize_corpus
from sae_nb.eval import (SAEBENCH_CORE_CATEGORIES, evaluate, feature_density, ratio_se, saebench_core_metrics,
                         write_saebench_core)
from sae_nb.models import load_model
from sae_nb.sae import SAE, SAEConfig

HOOK = "blocks.0.mlp.hook_post"


from test_reliability import one_thread  # noqa: F401,E402 (autouse fixture: one torch thread for tiny tensors)


@pytest.fixture(scope="module")
def model():
    return load_model("glassllm-en")


@pytest.fixture(scope="module")
def tokens(model):
    return tokenize_corpus(load_corpus("pydoc"), model, context_size=24, max_tokens=24 * 40, show_progress=False)


def random_sae(d_in, arch="topk", d_sae=96, seed=0):
    cfg = SAEConfig(arch, d_in=d_in, d_sae=d_sae, k=6 if arch in ("topk", "batchtopk") else None)
    return SAE.from_config(cfg, generator=torch.Generator().manual_seed(seed)).eval()


def clustered(W, T, g, rho=0.8):
    "W windows of T per-token values sharing a window effect: corr(t, t') = rho within a window, 0 across."
    return (math.sqrt(rho) * torch.randn(W, 1, generator=g, dtype=torch.float64)
            + math.sqrt(1 - rho) * torch.randn(W, T, generator=g, dtype=torch.float64) + 3.0)


def test_ratio_se_matches_the_spread_of_the_estimate_over_repeated_samples_of_correlated_windows():
    # 2,000 replicate eval sets of 40 windows x 30 tokens: the SE of each must match the sd of the estimate across
    # replicates, where a per-token SE (sd / sqrt(1,200)) would be ~4x too small
    g = torch.Generator().manual_seed(0)
    W, T, R = 40, 30, 2000
    x = clustered(W * R, T, g).reshape(R, W, T)
    estimates = x.mean((1, 2))
    ses = torch.tensor([ratio_se(x[r].sum(1), torch.full((W,), float(T))) for r in range(R)])
    true_sd = estimates.std().item()
    assert abs(ses.mean().item() / true_sd - 1) < 0.08
    naive = (x.reshape(R, -1).std(1) / math.sqrt(W * T)).mean().item()
    assert naive < 0.4 * true_sd  # what a per-token SE would have said
    # and the 95% interval covers the truth (3.0) about 95% of the time
    cover = ((estimates - 3.0).abs() <= 1.96 * ses).double().mean().item()
    assert 0.92 < cover < 0.97


def test_loss_recovered_se_by_the_delta_method_matches_the_spread_over_repeated_samples():
    # per-window CE sums of clean, SAE and zero runs, strongly correlated (the same tokens): the ratio's SE must
    # match its spread across replicates; adding three independent SEs would overstate it
    g = torch.Generator().manual_seed(1)
    W, R, T = 60, 2000, 30
    base = 3.0 + 0.5 * torch.randn(R, W, generator=g, dtype=torch.float64)
    clean = base * T
    zero = (base + 2.0 + 0.3 * torch.randn(R, W, generator=g, dtype=torch.float64)) * T
    sae = (base + 0.4 + 0.1 * torch.randn(R, W, generator=g, dtype=torch.float64)) * T
    lr = (zero - sae).sum(1) / (zero - clean).sum(1)
    ses = torch.tensor([ratio_se(zero[r] - sae[r], zero[r] - clean[r]) for r in range(R)])
    assert abs(ses.mean().item() / lr.std().item() - 1) < 0.08


def test_ratio_se_shrinks_like_one_over_the_square_root_of_the_windows():
    g = torch.Generator().manual_seed(2)
    se = {W: ratio_se(clustered(W, 16, g).sum(1), torch.full((W,), 16.0)) for W in (100, 400, 1600)}
    assert 1.6 < se[100] / se[400] < 2.5 and 1.6 < se[400] / se[1600] < 2.5


def test_ratio_se_edge_cases():
    assert math.isnan(ratio_se([1.0], [2.0]))                 # one window: no estimate of spread
    assert math.isnan(ratio_se([1.0, 2.0], [0.0, 0.0]))       # nothing counted
    assert ratio_se([3.0, 6.0], [1.0, 2.0]) == 0.0            # identical per-window ratios
    with pytest.raises(SaeNbError, match="one numerator and one denominator"): ratio_se([1.0, 2.0, 3.0], [1.0, 2.0])


def test_evaluate_reports_sample_sizes_and_standard_errors_that_shrink_with_more_windows(model, tokens):
    sae = random_sae(model.cfg.d_mlp)
    big = evaluate(model, sae, tokens, HOOK)
    quarters = [evaluate(model, sae, q, HOOK) for q in tokens.split(10)]  # the same windows, four disjoint sets of 10
    small = {k: sum(q[k] for q in quarters) / 4 for k in quarters[0] if not isinstance(quarters[0][k], torch.Tensor)}
    for key in ("ce_clean_se", "ce_sae_se", "ce_zero_se", "ce_mean_se", "kl_se", "kl_zero_se", "loss_recovered_se",
                "explained_variance_se", "fvu_se", "mse_se", "l0_se", "kl_div_score_se", "n_tokens", "n_windows"):
        assert key in big and math.isfinite(big[key]), key
    assert (small["n_windows"], big["n_windows"]) == (10, 40)
    assert big["n_tokens"] == 40 * 23  # BOS column left out
    for key in ("ce_sae_se", "kl_se", "loss_recovered_se", "fvu_se"):
        assert 1.2 < small[key] / big[key] < 4.0, (key, small[key], big[key])  # about sqrt(4) = 2 (one SE of 10 windows is itself noisy: the mean of four)


def test_feature_density_counts_do_not_depend_on_the_batch_size_and_match_evaluate(model, tokens):
    sae = random_sae(model.cfg.d_mlp, arch="standard", d_sae=64)
    with torch.no_grad(): sae.b_enc -= 1.0
    ref = evaluate(model, sae, tokens, HOOK)
    a = feature_density(model, sae, tokens, HOOK, n_tokens=None, batch_size=1)
    b = feature_density(model, sae, tokens, HOOK, n_tokens=None, batch_size=64)
    assert torch.equal(a["fired"], b["fired"]) and torch.equal(a["windows_fired"], b["windows_fired"])
    assert torch.allclose(a["mean_activation"], b["mean_activation"], rtol=1e-5, atol=1e-6)
    assert torch.allclose(a["feature_density"], ref["feature_density"])
    assert (a["n_tokens"], a["dead_fraction"]) == (ref["n_tokens"], ref["dead_fraction"])
    assert a["dead_upper_bound"] == 3 / a["n_tokens"] and a["min_density"] == 1 / a["n_tokens"]


def test_feature_density_reads_attention_hooks_flattened_over_heads(model, tokens):
    hook = "blocks.1.attn.hook_z"
    sae = random_sae(model.cfg.n_heads * model.cfg.d_head, arch="standard", d_sae=32)
    d = feature_density(model, sae, tokens[:6], hook, n_tokens=None)
    assert d["feature_density"].shape == (32,) and d["n_tokens"] == 6 * 23
    assert torch.allclose(d["feature_density"], evaluate(model, sae, tokens[:6], hook)["feature_density"])


def test_feature_density_refuses_too_few_tokens_before_running_the_model(model, tokens, monkeypatch):
    sae = random_sae(model.cfg.d_mlp)
    def no_forward(*a, **kw): raise AssertionError("the model ran before the request was checked")
    monkeypatch.setattr(model, "run_with_hooks", no_forward)
    with pytest.raises(SaeNbError, match="counted tokens"):
        feature_density(model, sae, tokens, HOOK)  # the default 100,000 tokens; these windows hold 920
    with pytest.raises(SaeNbError, match="positive integer"):
        feature_density(model, sae, tokens, HOOK, n_tokens=-5)


def test_feature_density_memory_does_not_grow_with_the_number_of_tokens(model, tokens, monkeypatch):
    # the largest tensor it makes is one batch's features: watch encode's outputs and what it returns
    sae = random_sae(model.cfg.d_mlp, d_sae=64)
    shapes, encode = [], sae.encode
    def watched(x):
        f = encode(x); shapes.append(tuple(f.shape)); return f
    monkeypatch.setattr(sae, "encode", watched)
    out = feature_density(model, sae, tokens, HOOK, n_tokens=None, batch_size=4)
    assert len(shapes) == 10 and max(s[0] for s in shapes) == 4
    assert all(v.numel() <= 64 for v in out.values() if isinstance(v, torch.Tensor))


def test_saebench_core_json_is_strict_json_with_saebench_keys_and_nan_as_null(model, tokens, tmp_path):
    zero = random_sae(model.cfg.d_mlp, arch="standard", d_sae=16)
    with torch.no_grad():
        for p in zero.parameters(): p.zero_()
    result = evaluate(model, zero, tokens[:4], HOOK)
    assert result["kl_div_score"] == 0.0 and result["cossim"] == 0.0  # the zero SAE IS the zero ablation; x_hat = 0
    result = dict(result, loss_recovered=math.nan)
    path = tmp_path / "saebench_core.json"
    write_saebench_core(path, result, feature_density(model, zero, tokens[:4], HOOK, n_tokens=None), zero,
                        eval_id="x", datetime_epoch_millis=1)
    text = path.read_text()
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert back["eval_type_id"] == "core"
    assert {k: list(v) for k, v in back["eval_result_metrics"].items()} == {k: list(v) for k, v in SAEBENCH_CORE_CATEGORIES.items()}
    assert back["eval_result_metrics"]["model_performance_preservation"]["ce_loss_score"] is None
    assert back["eval_result_metrics"]["misc_metrics"]["frac_alive"] == 0.0
    assert all(r["consistent_activation_heuristic"] is None for r in back["eval_result_details"])  # never fired
    assert back["eval_result_unstructured"]["feature_density_n_tokens"] == 4 * 23


def test_saebench_core_refuses_an_old_result_without_the_new_keys():
    with pytest.raises(SaeNbError, match="evaluate returns"):
        saebench_core_metrics(dict(l0=1.0, ce_clean=1.0, ce_sae=1.0, ce_zero=2.0, loss_recovered=1.0))


# -- several SAEs on one hook (a sweep): shared passes, identical numbers ------------------------------------------


def same_result(a, b):
    "Same keys and the same values, bit for bit (tensors equal, NaN where NaN)."
    assert a.keys() == b.keys(), (a.keys() ^ b.keys())
    for k in a:
        if isinstance(a[k], torch.Tensor): assert torch.equal(a[k], b[k]), k
        else: assert a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]), (k, a[k], b[k])
    return True


def test_evaluate_a_list_of_architectures_equals_separate_calls(model, tokens):
    d = model.cfg.d_mlp
    saes = [random_sae(d, "topk"), random_sae(d, "standard", seed=1), random_sae(d, "jumprelu", seed=3)]
    together = evaluate(model, saes, tokens[:4], HOOK, batch_size=2)
    assert isinstance(together, list) and len(together) == 3
    for sae, r in zip(saes, together):
        assert same_result(r, evaluate(model, sae, tokens[:4], HOOK, batch_size=2))
        assert not sae.training  # eval mode inside, the flag restored


def test_evaluate_a_list_of_transcoders_equals_separate_calls(model, tokens):
    hin, hout, dm = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out", model.cfg.d_model
    def tc(seed, **kw):
        cfg = SAEConfig("topk", d_in=dm, d_sae=32, k=4, transcoder=True, d_out=dm, hook_name=hin, hook_name_out=hout, **kw)
        return SAE.from_config(cfg, generator=torch.Generator().manual_seed(seed)).eval()
    tcs = [tc(0), tc(1, skip=True)]
    for a, t in zip(evaluate(model, tcs, tokens[:4], batch_size=2), tcs):
        assert same_result(a, evaluate(model, t, tokens[:4], batch_size=2))
    with pytest.raises(SaeNbError, match="same hooks"):  # an SAE and a transcoder replace different hooks
        evaluate(model, [tcs[0], random_sae(dm)], tokens[:6], hin)


def test_evaluate_a_list_refuses_mixed_hooks_before_running_the_model(model, tokens, monkeypatch):
    d = model.cfg.d_mlp
    a = SAE.from_config(SAEConfig("standard", d_in=d, d_sae=8, hook_name=HOOK))
    b = SAE.from_config(SAEConfig("standard", d_in=d, d_sae=8, hook_name="blocks.1.mlp.hook_post"))
    monkeypatch.setattr(model, "run_with_hooks", lambda *x, **kw: pytest.fail("the model ran before the list was checked"))
    with pytest.raises(SaeNbError, match=r"item 1: reads 'blocks.1.mlp.hook_post'"): evaluate(model, [a, b], tokens)
    with pytest.raises(SaeNbError, match="empty list"): evaluate(model, [], tokens, HOOK)
    with pytest.raises(SaeNbError, match="empty list"): feature_density(model, (), tokens, HOOK)


def test_feature_density_of_a_list_equals_separate_calls_with_one_stream(model, tokens, monkeypatch):
    d = model.cfg.d_mlp
    saes = [random_sae(d, "standard", d_sae=64, seed=s) for s in range(3)] + [random_sae(d, "topk")]
    with torch.no_grad(): saes[0].b_enc -= 1.0
    forwards, run = [], model.run_with_hooks
    def counted(*a, **kw): forwards.append(1); return run(*a, **kw)
    monkeypatch.setattr(model, "run_with_hooks", counted)
    together = feature_density(model, saes, tokens, HOOK, n_tokens=500, batch_size=8)
    assert len(forwards) == math.ceil(together[0]["n_windows"] / 8)  # one truncated pass per batch for all four SAEs
    for sae, r in zip(saes, together):
        assert same_result(r, feature_density(model, sae, tokens, HOOK, n_tokens=500, batch_size=8))
