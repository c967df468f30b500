"""Evaluation by replacement for transcoders (sae_nb.eval): hooks that disagree with the transcoder's config, an SAE
given an output hook, and an input hook firing after the output hook are refused before any work; BOS positions are
never replaced (the replacement at the output hook is masked by `counted_positions`), and the result carries the
standard errors of the SAE path. Hand-computed cases (exact and zero transcoders) are in nbs/06_eval.ipynb.
Run: `.venv/bin/python -m pytest -q tests/test_eval_transcoders.py`.
"""
import math

import pytest
import torch

from sae_nb.config import SaeNbError
from sae_nb.data import bos_token_id, load_corpus, tokenize_corpus
from sae_nb.eval import compare_top_tokens, evaluate, roundtrip, run_with_sae, splice_transcoder_hooks
from sae_nb.models import load_model
from sae_nb.sae import SAE, SAEConfig

IN, OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"


@pytest.fixture(scope="module")
def model():
    return load_model("glassllm-en")


@pytest.fixture(scope="module")
def tokens(model):
    return tokenize_corpus(load_corpus("pydoc"), model, context_size=16, max_tokens=16 * 12, show_progress=False)


def transcoder(model, hook_in=IN, hook_out=OUT, seed=0):
    d = model.cfg.d_model
    cfg = SAEConfig("topk", d_in=d, d_sae=32, k=4, transcoder=True, skip=True, d_out=d, hook_name=hook_in, hook_name_out=hook_out)
    tc = SAE.from_config(cfg, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(): tc.W_skip.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed + 1))
    return tc.eval()


@pytest.mark.parametrize("kw, message", [
    (dict(hook_name_out="blocks.1.hook_mlp_out"), "trained with hook_name_out"),
    (dict(hook_name="blocks.1.ln2.hook_normalized"), "trained with hook_name="),
    (dict(hook_name_out="blocks.0.hook_nonexistent"), "trained with hook_name_out"),
])
def test_mismatched_hooks_refused(model, tokens, kw, message):
    tc = transcoder(model)
    for call in (lambda: evaluate(model, tc, tokens, **kw), lambda: run_with_sae(model, tc, tokens[:1], **kw),
                 lambda: compare_top_tokens(model, tc, tokens[0], **kw)):
        with pytest.raises(SaeNbError, match=message): call()


def test_output_hook_needed_and_order_checked(model, tokens):
    tc = transcoder(model, hook_in=None, hook_out=None)  # no hooks in cfg: the ones passed are used
    with pytest.raises(SaeNbError, match="names no hook_name_out"): evaluate(model, tc, tokens, IN)
    # the input hook must fire first: block 1's MLP input cannot feed block 0's MLP output
    with pytest.raises(SaeNbError, match="does not fire before"): evaluate(model, tc, tokens, "blocks.1.ln2.hook_normalized", hook_name_out=OUT)
    with pytest.raises(SaeNbError, match="does not fire before"): evaluate(model, tc, tokens, OUT, hook_name_out=IN)
    sae = SAE.from_config(SAEConfig("standard", d_in=model.cfg.d_model, d_sae=8))
    with pytest.raises(SaeNbError, match="drop hook_name_out"): evaluate(model, sae, tokens, IN, hook_name_out=OUT)
    with pytest.raises(SaeNbError, match="does not apply"):
        roundtrip(SAE.from_config(SAEConfig("standard", d_in=8, d_sae=4, transcoder=True, d_out=6)))


def test_bos_positions_untouched(model, tokens):
    """At BOS (column 0) the output hook keeps the model's own activation; everywhere else it is sae(x)."""
    tc, bos = transcoder(model), bos_token_id(model)
    batch = tokens[:3].clone()
    assert (batch[:, 0] == bos).all()
    seen = {}
    def spy(act, hook): seen["y"] = act.clone()
    with torch.inference_mode():
        clean_y = model.run_with_cache(batch, names_filter=[IN, OUT])[1]
        mask = torch.ones_like(batch, dtype=torch.bool); mask[:, 0] = False
        model.run_with_hooks(batch, fwd_hooks=splice_transcoder_hooks(tc, IN, OUT, position_mask=mask) + [(OUT, spy)])
        assert seen["y"][:, 0].equal(clean_y[OUT][:, 0])
        assert torch.allclose(seen["y"][:, 1:], tc(clean_y[IN])[:, 1:], atol=1e-5)
        logits, clean = run_with_sae(model, tc, batch), model(batch)
    assert logits[:, 0].equal(clean[:, 0]) and not logits[:, 1:].equal(clean[:, 1:])
    # exclude_bos=False replaces column 0 too
    with torch.inference_mode(): assert not run_with_sae(model, tc, batch, exclude_bos=False)[:, 0].equal(clean[:, 0])
    # metrics leave BOS out: n_tokens counts the non-BOS positions only
    res = evaluate(model, tc, batch)
    assert res["n_tokens"] == 3 * (batch.shape[1] - 1)


def test_standard_error_keys_present(model, tokens):
    res = evaluate(model, transcoder(model), tokens, batch_size=4)
    ses = [k for k in res if k.endswith("_se")]
    assert set(ses) >= {"mse_se", "fvu_se", "explained_variance_se", "l0_se", "kl_se", "kl_zero_se", "kl_div_score_se",
                        "loss_recovered_se", "ce_clean_se", "ce_sae_se", "ce_zero_se", "ce_mean_se"}
    assert all(math.isfinite(res[k]) and res[k] >= 0 for k in ses), {k: res[k] for k in ses}
    assert res["n_windows"] == tokens.shape[0]
    # same keys as an SAE's result
    sae = SAE.from_config(SAEConfig("standard", d_in=model.cfg.d_model, d_sae=8))
    assert set(evaluate(model, sae, tokens[:4], IN)) == set(res)
