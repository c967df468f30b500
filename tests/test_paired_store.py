"""Paired activations (transcoders): `ActivationStore(..., hook_name_out=...)` yields `(x, y)` pairs of two hooks.

Sharding, damaged paired caches and the memory check; the notebook (03_activations, "Paired activations") covers
equality with run_with_cache, shuffling, resume and the cache round trip. Run:
`HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/test_paired_store.py`.
"""
import json, shutil

import numpy as np
import pytest
import torch

import sae_nb.config
from sae_nb.activations import ActivationStore
from sae_nb.config import SaeNbError
from test_reliability import one_thread  # noqa: F401 (autouse fixture: one torch thread for tiny tensors)
from test_edges_store import glass  # noqa: F401 (fixture: glassllm-en and 24 windows of 16 tokens, BOS first)

HIN, HOUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"  # glassllm-en: 128 -> 128
CTX = 16


def reference(model, tokens, hooks):
    "run_with_cache's activations of `hooks`, BOS column dropped, as `[n_windows, CTX - 1, width]` each."
    _, cache = model.run_with_cache(tokens, names_filter=list(hooks))
    return [cache[h][:, 1:].reshape(len(tokens), CTX - 1, -1) for h in hooks]


def cat_pairs(store):
    pairs = list(store)
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


def sorted_rows(x):
    a = x.numpy()
    return a[np.lexsort(a.T[::-1])]


def test_two_ranks_cover_every_pair_once(glass):
    "Rank r of 2 yields exactly the pairs of windows r, r + 2, ... (unshuffled, in order); shuffled, the same multiset."
    model, tokens = glass
    ref_x, ref_y = reference(model, tokens, (HIN, HOUT))
    kw = dict(hook_name_out=HOUT, batch_size=40, buffer_size=200, loop=False, world_size=2, show_progress=False)
    owned = []
    for rank in (0, 1):
        store = ActivationStore(model, tokens, HIN, shuffle=False, rank=rank, **kw)
        owned += store._windows.tolist()
        x, y = cat_pairs(store)
        # exactly the pairs of this rank's windows, in window order: x and y of the same token side by side
        torch.testing.assert_close(x, ref_x[rank::2].reshape(-1, x.shape[1]), rtol=0, atol=1e-5)
        torch.testing.assert_close(y, ref_y[rank::2].reshape(-1, y.shape[1]), rtol=0, atol=1e-5)
        sx, sy = cat_pairs(ActivationStore(model, tokens, HIN, shuffle=True, seed=1, rank=rank, **kw))
        assert not torch.equal(sx, x)
        assert (sorted_rows(torch.cat([sx, sy], 1)) == sorted_rows(torch.cat([x, y], 1))).all()  # pairs kept together
    assert sorted(owned) == list(range(len(tokens)))  # the ranks' windows: every window once


def paired_cache(glass, folder):
    model, tokens = glass
    ActivationStore(model, tokens, HIN, hook_name_out=HOUT, batch_size=40, show_progress=False).save_cache(folder)
    return json.loads((folder / "metadata.json").read_text())


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(d_out=m["d_out"] + 1), "metadata.json says"),  # shards narrower than d_in + d_out
    (lambda m: m.update(d_out=m["d_out"] - 1), "metadata.json says"),
    (lambda m: m.update(d_in=m["d_in"] - 1, d_out=m["d_out"] + 1), None),  # same total width: split moved, see below
    (lambda m: m.pop("d_out"), "d_out"),
    (lambda m: m.update(d_out=0), "d_out"),
    (lambda m: m.update(d_out=True), "d_out"),
    (lambda m: m.pop("hook_name_out"), "d_out"),  # a width for a target no longer named
    (lambda m: m.update(hook_name_out=7), "hook_name_out"),
])
def test_damaged_paired_cache_is_refused(glass, tmp_path, edit, message):
    "A paired cache whose metadata contradicts its shards (d_out) is one SaeNbError naming the problem, before any read."
    meta = paired_cache(glass, tmp_path / "p")
    edit(meta)
    (tmp_path / "p" / "metadata.json").write_text(json.dumps(meta))
    if message is None:  # widths still add up: the shards cannot tell, the store splits where metadata says
        x, y = next(ActivationStore.from_cache(tmp_path / "p", batch_size=8, show_progress=False))
        assert (x.shape[1], y.shape[1]) == (meta["d_in"], meta["d_out"])
        return
    with pytest.raises(SaeNbError, match=message):
        ActivationStore.from_cache(tmp_path / "p", batch_size=8, show_progress=False)


def test_paired_cache_refused_for_other_target(glass, tmp_path):
    "expect_hook_out: a paired cache of another target, or an unpaired cache, is refused naming both hooks."
    model, tokens = glass
    paired_cache(glass, tmp_path / "p")
    with pytest.raises(SaeNbError, match="blocks.0.mlp.hook_post"):
        ActivationStore.from_cache(tmp_path / "p", expect_hook_out="blocks.0.mlp.hook_post")
    ActivationStore(model, tokens, HIN, batch_size=40, show_progress=False).save_cache(tmp_path / "u")
    with pytest.raises(SaeNbError, match="not \\(input, target\\) pairs"):
        ActivationStore.from_cache(tmp_path / "u", expect_hook_out=HOUT)
    x = next(ActivationStore.from_cache(tmp_path / "u", batch_size=8, expect_hook=HIN, show_progress=False))
    assert isinstance(x, torch.Tensor) and x.shape == (8, 128)  # an unpaired cache still reads as before


def test_memory_check_counts_both_widths(glass, monkeypatch):
    "The buffer check sizes rows as d_in + d_out: memory that fits the input alone refuses the pairs, before allocating."
    model, tokens = glass
    hin, hout = "blocks.0.hook_resid_mid", "blocks.0.mlp.hook_post"  # 128 -> 341: the target is the wide one
    seen = []
    real = sae_nb.activations.check_fits_in_memory
    monkeypatch.setattr(sae_nb.activations, "check_fits_in_memory", lambda n, *a, **k: (seen.append(n), real(n, *a, **k)))
    kw = dict(batch_size=64, buffer_size=300, show_progress=False)
    ActivationStore(model, tokens, hin, **kw)
    ActivationStore(model, tokens, hin, hook_name_out=hout, **kw)
    rows = 300 + 32 * (CTX - 1)  # buffer + one model batch of rows (model_batch_size 32 windows)
    assert seen == [rows * 128 * 4 + 16 * 300, rows * (128 + 341) * 4 + 16 * 300]
    monkeypatch.setattr(sae_nb.config, "_physical_memory", lambda: (seen[0] + seen[1]) // 2)
    ActivationStore(model, tokens, hin, **kw)  # the input alone fits
    with pytest.raises(SaeNbError, match=r"rows of 469 x float32"):
        ActivationStore(model, tokens, hin, hook_name_out=hout, **kw)
