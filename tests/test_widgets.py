"""Edge cases of the prompt-features widget and feature ablation (sae_nb.widgets), on glassllm-en with random SAEs.

The notebook (nbs/08_widgets.ipynb) checks the widgets on a trained SAE; here: every architecture and hook shape the
ablation splices (an ablation removes exactly the feature's decoder contribution, and nothing when the feature is
silent), hostile prompt text (HTML escaping, fuzzed prompts), a typed prompt that the ablation positions do not fit
(reported in the widget, state kept), an explorer fed a feature index with a feature that never fires, and a
transcoder's logit effects (read where its decoder writes). Untrained SAEs: their features fire at random, which is
all these checks need, and they build in milliseconds.
"""
import html

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from sae_nb.config import SaeNbError
from sae_nb.models import load_model
from sae_nb.plots import feature_activations, feature_logit_effects
from sae_nb.sae import SAE, SAEConfig
from sae_nb.widgets import (FeatureExplorer, PromptFeaturesWidget, ablate_feature, ablated_next_token_probs,
                            prompt_features, prompt_table_html, prompt_tokens_html)

PROMPT = "The cat sat on the mat because it was"


@pytest.fixture(scope="module")
def model():
    return load_model("glassllm-en", device="cpu")


def random_sae(model, hook, architecture="standard", d_sae=64, seed=0, **kw):
    "An untrained SAE reading `hook` (its width from the model's config)."
    c = model.cfg
    d_in = c.n_heads * c.d_head if hook.endswith("hook_z") else c.d_mlp if hook.endswith("mlp.hook_post") else c.d_model
    cfg = SAEConfig(architecture, d_in=d_in, d_sae=d_sae, hook_name=hook, **kw)
    sae = SAE.from_config(cfg, generator=torch.Generator().manual_seed(seed)).eval()
    with torch.no_grad(): sae.W_enc[:, 0], sae.b_enc[0] = 0.0, -1.0  # feature 0 never fires (random features fire everywhere)
    return sae


def probs_without(model, hook, tokens, acts, W_dec, f, act_shape=None):
    "Next-token probabilities with feature f's decoder contribution acts[:, f] * W_dec[f] subtracted at `hook` by hand."
    contrib = acts[:, f][None, :, None] * W_dec[f].detach()
    def hook_fn(act, hook): return act - contrib.reshape(act.shape)
    with torch.inference_mode():
        return model.run_with_hooks(tokens, fwd_hooks=[(hook, hook_fn)])[0, -1].softmax(-1)


CASES = [("standard", "blocks.0.mlp.hook_post", {}), ("topk", "blocks.1.hook_resid_pre", dict(k=4)),
         ("jumprelu", "blocks.0.attn.hook_z", {}), ("batchtopk", "blocks.2.mlp.hook_post", dict(k=4))]


@pytest.mark.parametrize("architecture,hook,kw", CASES, ids=[c[0] for c in CASES])
def test_ablation_is_the_decoder_contribution(model, architecture, hook, kw):
    # TopK/BatchTopK: the feature is zeroed after the selection, so no other feature takes its slot and the result is
    # exactly the hand subtraction; hook_z: the flat decoder row is reshaped to the heads
    sae = random_sae(model, hook, architecture, **kw)
    tokens = model.to_tokens(PROMPT)
    acts = feature_activations(model, sae, tokens, hook)[0]
    loud, quiet = int(acts[-1].argmax()), 0
    assert acts[:, quiet].abs().max() == 0
    assert acts[-1, loud] > 0
    p_spliced, p_ablated, seen = ablated_next_token_probs(model, sae, PROMPT, loud, hook)
    torch.testing.assert_close(seen, acts[:, loud], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p_ablated, probs_without(model, hook, tokens, acts, sae.W_dec, loud), atol=1e-5, rtol=1e-4)
    with torch.inference_mode(): clean = model(tokens)[0, -1].softmax(-1)
    torch.testing.assert_close(p_spliced, clean, atol=1e-5, rtol=1e-4)  # error term kept: the clean model
    assert (p_ablated - p_spliced).abs().max() > 0
    a, b, _ = ablated_next_token_probs(model, sae, PROMPT, quiet, hook)
    assert torch.equal(a, b)  # a silent feature changes nothing, bit for bit


def test_ablation_frame_and_errors(model):
    sae = random_sae(model, "blocks.0.mlp.hook_post")
    df = ablate_feature(model, sae, PROMPT, 3, k=7)  # hook_name from sae.cfg
    assert list(df.columns) == ["token", "token_id", "p_spliced", "p_ablated", "change"] and len(df) == 7
    assert list(df.change.abs()) == sorted(df.change.abs(), reverse=True)
    for bad, msg in ((dict(feature=64), "0..63"), (dict(feature=True), "out of range"), (dict(positions="first"), "list of token"),
                     (dict(positions=[]), "list of token"), (dict(positions=[True]), "list of token"), (dict(k=-1), "positive")):
        args = dict(feature=3) | bad
        with pytest.raises(SaeNbError, match=msg): ablate_feature(model, sae, PROMPT, **args)
    with pytest.raises(SaeNbError, match="one prompt"): ablate_feature(model, sae, ["a b", "c d"], 3)
    no_hook = SAE.from_config(SAEConfig("standard", d_in=model.cfg.d_mlp, d_sae=8))
    with pytest.raises(SaeNbError, match="pass hook_name"): ablate_feature(model, no_hook, PROMPT, 3)


def test_prompt_html_escapes_everything(model):
    sae = random_sae(model, "blocks.0.mlp.hook_post")
    text = "<script>alert('x')</script> & \"q\""
    table = prompt_features(model, sae, text, k=3)
    labels = ["<img src=x onerror=alert(1)>'\""] * 64
    for out in (prompt_tokens_html(table, 0, labels=labels), prompt_table_html(table, labels)):
        assert "<script" not in out and "<img" not in out, out
    pw = PromptFeaturesWidget(model, sae, prompt=text, k=3)
    assert "<script" not in pw.tokens_html.value and "<script" not in pw.table_html.value


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(min_size=1, max_size=30))
def test_prompt_features_fuzz(model, text):
    sae = random_sae(model, "blocks.0.mlp.hook_post")
    try: table = prompt_features(model, sae, text, k=4)
    except SaeNbError: return  # refused with a message (e.g. text that tokenises to nothing)
    assert list(table.token) == model.to_str_tokens(model.to_tokens(text)[0])
    for r in table.itertuples():
        assert len(r.features) <= 4 and all(a > 0 for a in r.activations)
        assert r.activations == sorted(r.activations, reverse=True)
    prompt_tokens_html(table, 0)


def test_widget_keeps_its_state_when_a_typed_prompt_does_not_fit(model):
    sae = random_sae(model, "blocks.0.mlp.hook_post")
    pw = PromptFeaturesWidget(model, sae, prompt=PROMPT, positions=[8])
    pw.open(int(pw.table.features[8][0]))
    before = pw.table.copy(), pw.changes.copy()
    pw.prompt_box.value = "Hi"  # 2 tokens: position 8 does not exist
    assert "positions" in pw.info.value and pw.prompt == PROMPT
    assert pw.table.equals(before[0]) and pw.changes.equals(before[1])
    pw.prompt_box.value = PROMPT + " happy"
    assert pw.prompt == PROMPT + " happy" and len(pw.table) == model.to_tokens(PROMPT + " happy").shape[1]
    with pytest.raises(SaeNbError, match="list of token"): PromptFeaturesWidget(model, sae, prompt="Hi", positions=[8])
    with pytest.raises(SaeNbError, match="positive"): PromptFeaturesWidget(model, sae, prompt=PROMPT, k=0)
    with pytest.raises(SaeNbError, match="on_feature"): PromptFeaturesWidget(model, sae, prompt=PROMPT, on_feature=3)


class FakeIndex:
    "The feature-index interface the explorer reads (sae_nb.features.FeatureIndex), with a feature that never fires."
    hook_name, d_sae, n_tokens = "blocks.0.mlp.hook_post", 64, 100
    labels = [None] * 64
    def feature(self, f):
        return dict(feature=f, density=0.0, max_act=0.0, n_fired=0, quantiles=[], histogram={"edges": [], "counts": []},
                    top=[], intervals=[], logits_up=[], logits_down=[], neighbours=[], cooccurrence=[], roundtrip=None,
                    label=None, label_score=None, label_detail=None)


def test_explorer_on_a_feature_that_never_fires_in_the_index(model):
    sae = random_sae(model, "blocks.0.mlp.hook_post")
    fx = FeatureExplorer(model, sae, index=FakeIndex(), feature=5)
    assert "never fires" in fx.snippets.value and "0 of 100 tokens" in fx.stats.value
    assert fx.effects is None and "No logit effects" in fx.figures["logit_effects"].layout.title.text
    assert fx.links.value == "" and fx.intervals.value == ""
    with pytest.raises(SaeNbError, match="64 features"):
        FeatureExplorer(model, random_sae(model, "blocks.0.mlp.hook_post", d_sae=32), index=FakeIndex())
    pw = PromptFeaturesWidget(model, sae, prompt=PROMPT, index=FakeIndex())
    pw.open(5)
    assert pw.explorer.from_feature_index and "fires on 0.000%" in pw.info.value


def test_transcoder_explorer_reads_logit_effects_at_its_output_hook(model):
    # before: the explorer asked for logit effects at the transcoder's *input* hook (ln2.hook_normalized), which has no
    # linear path to the logits: the panel said "No logit effects". The decoder writes hook_mlp_out.
    mlp_in, mlp_out = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
    tc = SAE.from_config(SAEConfig("standard", d_in=model.cfg.d_model, d_sae=32, transcoder=True, hook_name=mlp_in,
                                   hook_name_out=mlp_out), generator=torch.Generator().manual_seed(0)).eval()
    tokens = model.to_tokens([PROMPT, "import os and sys"])[:, :6]
    fx = FeatureExplorer(model, tc, tokens, feature=2, k_logits=5)
    assert fx.hook_name == mlp_in and fx.logit_hook == mlp_out
    assert fx.effects is not None and fx.effects.equals(feature_logit_effects(model, tc, 2, mlp_out, k=5))


def test_transcoder_steering_adds_at_the_output_hook(model):
    # before: steering added the transcoder's decoder row at its *input* hook (ln2.hook_normalized: the same width as
    # hook_mlp_out here, so it ran and was silently wrong); its decoder writes hook_mlp_out
    from sae_nb.data import bos_token_id, counted_positions
    from sae_nb.widgets import SteeringWidget, steered_next_token_probs
    mlp_in, mlp_out = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
    tc = SAE.from_config(SAEConfig("standard", d_in=model.cfg.d_model, d_sae=32, transcoder=True, hook_name=mlp_in,
                                   hook_name_out=mlp_out), generator=torch.Generator().manual_seed(0)).eval()
    tokens = model.to_tokens(PROMPT)
    mask = counted_positions(tokens, bos_token_id(model))[0]
    def by_hand(at):
        add = 5.0 * tc.W_dec[2].detach() * mask[None, :, None]
        with torch.inference_mode():
            return model.run_with_hooks(tokens, fwd_hooks=[(at, lambda act, hook: act + add)])[0, -1].softmax(-1)
    p = steered_next_token_probs(model, tc, mlp_in, PROMPT, 2, 5.0)
    torch.testing.assert_close(p, by_hand(mlp_out), atol=1e-5, rtol=1e-4)
    assert (p - by_hand(mlp_in)).abs().max() > 1e-4
    sw = SteeringWidget(model, tc, mlp_in, PROMPT, feature=2, scale=5.0, max_scale=10.0)
    assert sw.steer_hook == mlp_out and torch.equal(sw.probs_steered, p) and mlp_out in sw.info.value
