"""The feature index (11_features, `sae_nb.features`): damaged, missing and mismatched files, refusals before any
work, the sampled co-occurrence estimate, seeded reservoirs, transcoders' logit hook. glassllm-en, a random TopK SAE,
a few hundred tokens: every test takes seconds."""
import json
import math
from pathlib import Path

import pytest
import torch

from sae_nb.config import SaeNbError
from sae_nb.data import load_corpus, tokenize_corpus
from sae_nb.models import load_model
from sae_nb.plots import feature_activations, logit_direction
from sae_nb.sae import SAE, SAEConfig
from sae_nb.features import (FeatureIndex, INDEX_JSON, INDEX_TENSORS, build_feature_index, label_features, _logit_tops)

HOOK = "blocks.0.mlp.hook_post"


@pytest.fixture(scope="module")
def glass():
    "(model, sae, tokens, index): glassllm-en, a seeded 64-feature TopK SAE, 12 windows of 32 tokens, the index built on them."
    model = load_model("glassllm-en", device="cpu")
    torch.manual_seed(0)
    sae = SAE.from_config(SAEConfig(architecture="topk", k=6, d_in=model.cfg.d_mlp, d_sae=64, hook_name=HOOK)).eval()
    tokens = tokenize_corpus(load_corpus("pydoc"), model, context_size=32, max_tokens=32 * 12, show_progress=False)
    index = build_feature_index(model, sae, tokens, k_top=5, n_intervals=3, samples_per_interval=2, show_progress=False)
    return model, sae, tokens, index


@pytest.fixture
def saved(glass, tmp_path):
    folder = tmp_path / "features"
    glass[3].save(folder)
    return folder


def test_roundtrip_equal(glass, saved):
    index = glass[3]
    back = FeatureIndex.load(saved)
    for f in range(index.d_sae): assert back.feature(f) == index.feature(f)
    assert back.token_lookup(" the") == index.token_lookup(" the")


@pytest.mark.parametrize("damage", ["truncate", "not_json", "wrong_format", "missing_key", "wrong_type", "short_labels",
                                    "newer_version", "deep"])
def test_damaged_json_is_a_named_error(saved, damage):
    p = saved / INDEX_JSON
    meta = json.loads(p.read_text())
    if damage == "truncate": p.write_text(p.read_text()[:1000])
    elif damage == "not_json": p.write_bytes(b"\xff\xfe garbage")
    elif damage == "deep": p.write_text("[" * 100000 + "]" * 100000)
    else:
        if damage == "wrong_format": meta["format"] = "something else"
        elif damage == "missing_key": del meta["settings"]
        elif damage == "wrong_type": meta["d_sae"] = "64"
        elif damage == "short_labels": meta["labels"] = meta["labels"][:-1]
        elif damage == "newer_version": meta["version"] = 99
        p.write_text(json.dumps(meta))
    with pytest.raises(SaeNbError, match=str(p.name)): FeatureIndex.load(saved)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_damaged_safetensors_is_a_named_error(saved, damage):
    p = saved / INDEX_TENSORS
    if damage == "truncate": p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif damage == "garbage": p.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    else: p.unlink()
    with pytest.raises(SaeNbError, match=INDEX_TENSORS): FeatureIndex.load(saved)


def test_files_that_do_not_belong_together(glass, saved, tmp_path):
    model, sae, tokens, index = glass
    other = build_feature_index(model, sae, tokens, k_top=3, n_intervals=3, samples_per_interval=2, show_progress=False)
    other.save(tmp_path / "other")
    (saved / INDEX_TENSORS).write_bytes((tmp_path / "other" / INDEX_TENSORS).read_bytes())  # k_top 3 tensors, JSON says 5
    with pytest.raises(SaeNbError, match="do not belong together"): FeatureIndex.load(saved)


@pytest.mark.parametrize("name,value,msg", [("top_ctx_tok", 10**6, "outside the vocabulary"), ("label_tok", -5, "outside the vocabulary"),
                                            ("nb_ids", 64, "feature ids outside"), ("co_ids", -2, "feature ids outside"),
                                            ("logit_up_ids", 10**6, "outside the vocabulary")])
def test_out_of_range_ids_are_refused(glass, saved, name, value, msg):
    "Ids a view would index with (token strings, other features) are checked at load, not found broken in a dashboard."
    from safetensors.torch import load_file, save_file
    t = load_file(str(saved / INDEX_TENSORS))
    t[name].view(-1)[0] = value
    save_file(t, str(saved / INDEX_TENSORS))
    with pytest.raises(SaeNbError, match=msg): FeatureIndex.load(saved)


def test_save_refuses_another_saes_index(glass, saved):
    model, sae, tokens, index = glass
    other_sae = SAE.from_config(SAEConfig(architecture="topk", k=6, d_in=model.cfg.d_mlp, d_sae=64, hook_name=HOOK)).eval()
    other = build_feature_index(model, other_sae, tokens, k_top=5, n_intervals=3, samples_per_interval=2, show_progress=False)
    before = (saved / INDEX_JSON).read_bytes()
    with pytest.raises(SaeNbError, match="different SAE"): other.save(saved)
    assert (saved / INDEX_JSON).read_bytes() == before  # nothing touched
    index.save(saved)  # the same SAE's index is replaced freely
    other.save(saved, overwrite=True)
    assert FeatureIndex.load(saved).meta["sae_fingerprint"] == other.meta["sae_fingerprint"]


@pytest.mark.parametrize("kwargs,msg", [(dict(k_top=0), "k_top"), (dict(context=(3,)), "context"), (dict(batch_size=1.5), "batch_size"),
                                        (dict(hook_name="blocks.9.mlp.hook_post"), "blocks.9"), (dict(n_intervals=True), "n_intervals"),
                                        (dict(hook_name_out="blocks.0.hook_mlp_out"), "transcoders")])
def test_refusals_before_the_pass(glass, kwargs, msg, monkeypatch):
    model, sae, tokens, _ = glass
    import sae_nb.features as F
    monkeypatch.setattr(F, "_encode_windows", lambda *a, **k: pytest.fail("the pass started"))
    with pytest.raises(SaeNbError, match=msg): build_feature_index(model, sae, tokens, show_progress=False, **kwargs)


def test_bad_tokens_are_refused(glass):
    model, sae, tokens, _ = glass
    with pytest.raises(SaeNbError): build_feature_index(model, sae, tokens.float(), show_progress=False)
    with pytest.raises(SaeNbError, match="vocabulary"): build_feature_index(model, sae, tokens + 10**6, show_progress=False)


def test_seeded_reservoir(glass):
    model, sae, tokens, index = glass
    kw = dict(k_top=5, n_intervals=3, samples_per_interval=2, show_progress=False)
    again = build_feature_index(model, sae, tokens, **kw)
    assert torch.equal(again.t["res_win"], index.t["res_win"]) and torch.equal(again.t["res_pos"], index.t["res_pos"])
    other = build_feature_index(model, sae, tokens, seed=1, reservoir=4, **kw)
    assert not torch.equal(other.t["res_win"][:, :4], index.t["res_win"][:, :4])


def test_reservoir_is_uniform():
    "Every firing is equally likely to be sampled, whatever its batch or activation: 400 seeds, 40 firings in 4 batches, 5 kept."
    from sae_nb.features import _TopBuffer
    hits = torch.zeros(4, 10)
    F = torch.linspace(0.1, 4.0, 40).reshape(4, 10, 1)  # batch b, position p: activation grows with the stream
    zeros, idx = torch.zeros(10, dtype=torch.long), torch.arange(10)
    for seed in range(400):
        g, res = torch.Generator().manual_seed(seed), _TopBuffer(1, 5, 0, 0, "cpu")
        for b in range(4):  # as _Stream.add: uniform random keys, one per firing
            res.update(zeros, torch.rand(10, generator=g), idx, F[b, :, 0], F[b], torch.zeros(1, 10, dtype=torch.long), b)
        hits[res.win[0], res.pos[0]] += 1
    # each of the 40 firings: expected 400 * 5 / 40 = 50 hits (sd ~6.6); a heap biased to early, late or strong firings fails
    assert hits.sum() == 2000 and hits.min() > 25 and hits.max() < 75, hits
    assert abs(hits[:2].sum() - hits[2:].sum()) < 150  # early and late batches alike


def test_sampled_cooccurrence_estimates_the_exact_one(glass):
    model, sae, tokens, index = glass
    sampled = build_feature_index(model, sae, tokens, k_top=5, n_intervals=3, samples_per_interval=2, show_progress=False,
                                  cooccurrence="sampled", reservoir=10**4)  # all firings sampled: the estimate is exact
    assert sampled.meta["settings"]["cooccurrence"] == "sampled" and index.meta["settings"]["cooccurrence"] == "exact"
    dense = feature_activations(model, sae, tokens, HOOK).flatten(0, 1) > 0
    C = dense.float().T @ dense.float()
    for f in range(0, 64, 7):
        got = sampled.feature(f)["cooccurrence"]
        if not got: continue
        g, frac = got[0]
        # the sampled mode keeps the n_cooccurrence strongest co-firing features per token: k=6 here, so all of them
        assert math.isclose(frac, (C[f, g] / C[f, f]).item(), rel_tol=1e-6)
        assert math.isclose(frac, index.feature(f)["cooccurrence"][0][1], rel_tol=1e-6)


def test_peak_memory_does_not_grow_with_tokens(glass):
    "The accumulators are allocated before the pass and never grow: the same sizes for 4 and 12 windows."
    model, sae, tokens, _ = glass
    import sae_nb.features as F
    sizes = []
    for n in (4, 12):
        st = {}
        orig = F._finish_index
        def grab(model_, sae_, stream, **kw):
            st["bytes"] = sum(v.numel() * v.element_size() for v in vars(stream).values() if isinstance(v, torch.Tensor))
            st["bytes"] += sum(v.numel() * v.element_size() for b in (stream.top, stream.res) for v in vars(b).values() if isinstance(v, torch.Tensor))
            return orig(model_, sae_, stream, **kw)
        F._finish_index = grab
        try: build_feature_index(model, sae, tokens[:n], show_progress=False)
        finally: F._finish_index = orig
        sizes.append(st["bytes"])
    assert sizes[0] == sizes[1]


def test_transcoder_logits_use_the_output_hook(glass):
    model, _, tokens, _ = glass
    tc = SAE.from_config(SAEConfig(architecture="topk", k=6, d_in=model.cfg.d_model, d_sae=32, transcoder=True,
                                   hook_name="blocks.0.ln2.hook_normalized", hook_name_out="blocks.0.hook_mlp_out")).eval()
    ix = build_feature_index(model, tc, tokens[:4], k_top=3, n_intervals=2, samples_per_interval=1, show_progress=False)
    assert ix.meta["hook_name_out"] == "blocks.0.hook_mlp_out"
    ref = logit_direction(model, tc, 5, "blocks.0.hook_mlp_out")  # the decoder row is written to hook_mlp_out
    assert [t for t, _ in ix.feature(5)["logits_up"]][:3] == model.to_str_tokens(ref.topk(3).indices)


def test_label_features_refusals(glass):
    model, sae, tokens, index = glass
    with pytest.raises(SaeNbError, match="pass model and sae"): label_features(index, tokens=tokens)
    with pytest.raises(SaeNbError, match="already holds"): label_features(index)
    with pytest.raises(SaeNbError, match="out of range"): label_features(index, features=[64], explainer=lambda v: {})


def test_cooccurrence_modes(glass):
    model, sae, tokens, _ = glass
    with pytest.raises(SaeNbError, match="cooccurrence="): build_feature_index(model, sae, tokens, cooccurrence="dense", show_progress=False)
    with pytest.raises(SaeNbError, match="count matrix"):
        build_feature_index(model, sae, tokens, cooccurrence="exact", cooccurrence_max_d=32, show_progress=False)
    ix = build_feature_index(model, sae, tokens[:2], cooccurrence_max_d=32, show_progress=False)  # auto, over the limit
    assert ix.meta["settings"]["cooccurrence"] == "sampled"
