"""Edges of the activation store (sae_nb.activations): BOS columns, buffer sizing, symbolic links, damaged resume states.

Each test names the case it covers; tests/README.md has the table (case | before | now | test). Run:
`HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/test_edges_store.py`.
"""
import contextlib, json, os, shutil, signal, warnings
from pathlib import Path

import pytest
import torch

from sae_nb.activations import ActivationStore
from sae_nb.config import SaeNbError
from test_reliability import one_thread  # noqa: F401 (autouse fixture: one torch thread for tiny tensors)

HOOK = "blocks.0.mlp.hook_post"  # glassllm-en: 341 wide
CTX = 16


@pytest.fixture(scope="module")
def glass():
    "glassllm-en and 24 windows of 16 tokens of the embedded corpus, BOS first (its BOS is 2, its EOS separator 3)."
    from sae_nb.data import load_corpus, tokenize_corpus
    from sae_nb.models import load_model
    model = load_model("glassllm-en", device="cpu")
    tokens = tokenize_corpus(load_corpus("pydoc"), model, context_size=CTX, max_tokens=CTX * 24, show_progress=False)
    return model, tokens


@pytest.fixture(scope="module")
def no_bos_tokens(glass):
    "The same corpus tokenised with prepend_bos=False: column 0 is a real token in every window."
    from sae_nb.data import load_corpus, tokenize_corpus
    model, _ = glass
    return tokenize_corpus(load_corpus("pydoc"), model, context_size=CTX, max_tokens=CTX * 24, prepend_bos=False,
                           show_progress=False)


def hook_acts(model, tokens):
    "The hook's activations [n, pos, d_in] from run_with_cache, the reference."
    _, cache = model.run_with_cache(tokens, names_filter=HOOK)
    return cache[HOOK]


def one_pass(store):
    return torch.cat(list(store))


def store_of(model, tokens, **kw):
    return ActivationStore(model, tokens, HOOK, **{**dict(batch_size=32, shuffle=False, loop=False, show_progress=False), **kw})


@contextlib.contextmanager
def within(seconds):
    "Fail with TimeoutError (instead of hanging the suite) when the block runs longer than `seconds`."
    def stop(*_): raise TimeoutError(f"took more than {seconds} s")
    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try: yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# --- item 2: what BOS is -----------------------------------------------------------------------------------------
def test_windows_tokenised_without_bos_keep_all_context_size_rows(glass, no_bos_tokens):
    model, _ = glass
    assert not (no_bos_tokens[:, 0] == model.tokenizer.bos_token_id).any()
    store = store_of(model, no_bos_tokens)
    assert (store.rows_per_window, store.bos_excluded) == (CTX, False)
    torch.testing.assert_close(one_pass(store), hook_acts(model, no_bos_tokens).reshape(-1, 341), atol=1e-5, rtol=0)


def test_a_model_without_a_bos_token_keeps_every_column(glass, monkeypatch):
    model, tokens = glass
    monkeypatch.setattr(model, "tokenizer", None)  # no tokenizer: no BOS token id (sae_nb.data.bos_token_id gives None)
    store = store_of(model, tokens)
    assert store.rows_per_window == CTX and store.n_tokens == len(tokens) * CTX


def test_eos_equal_bos_separators_mid_window_are_kept(glass, no_bos_tokens):
    "BOS ids inside a window are document separators (EOS == BOS models): real tokens, never dropped."
    model, tokens = glass
    bos = model.tokenizer.bos_token_id
    with_bos = tokens.clone(); with_bos[:, 5] = bos; with_bos[::3, 11] = bos
    store = store_of(model, with_bos)
    assert store.rows_per_window == CTX - 1  # only column 0 goes
    torch.testing.assert_close(one_pass(store), hook_acts(model, with_bos)[:, 1:].reshape(-1, 341), atol=1e-5, rtol=0)
    without = no_bos_tokens.clone(); without[:, 7] = bos  # no BOS first, separators inside: every column kept
    store = store_of(model, without)
    assert store.rows_per_window == CTX
    torch.testing.assert_close(one_pass(store), hook_acts(model, without).reshape(-1, 341), atol=1e-5, rtol=0)


def test_windows_of_which_only_some_start_with_bos_are_refused(glass, no_bos_tokens):
    model, tokens = glass
    mixed = torch.cat([tokens[:3], no_bos_tokens[3:]])
    with pytest.raises(SaeNbError, match="3 of 24 token windows start with the BOS token") as e: store_of(model, mixed)
    assert "prepend_bos=True" in str(e.value) and "exclude_bos=False" in str(e.value)
    assert store_of(model, mixed, exclude_bos=False).rows_per_window == CTX  # every column, as asked


def test_the_cache_records_whether_column_0_was_dropped_and_old_caches_stay_readable(glass, no_bos_tokens, tmp_path):
    model, tokens = glass
    store_of(model, no_bos_tokens[:4]).save_cache(tmp_path / "nobos")
    meta = json.loads((tmp_path / "nobos" / "metadata.json").read_text())
    assert (meta["exclude_bos"], meta["bos_excluded"], meta["rows_per_window"]) == (True, False, CTX)
    assert ActivationStore.from_cache(tmp_path / "nobos", batch_size=16, show_progress=False).n_tokens == 4 * CTX
    store_of(model, tokens[:4]).save_cache(tmp_path / "old")  # a cache as written before `bos_excluded` existed
    meta = json.loads((tmp_path / "old" / "metadata.json").read_text())
    assert meta.pop("bos_excluded") is True
    (tmp_path / "old" / "metadata.json").write_text(json.dumps(meta))
    assert ActivationStore.from_cache(tmp_path / "old", batch_size=16, show_progress=False).rows_per_window == CTX - 1
    meta["bos_excluded"] = False  # contradicts rows_per_window = context_size - 1
    (tmp_path / "old" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(SaeNbError, match="rows_per_window=15 contradicts"):
        ActivationStore.from_cache(tmp_path / "old", batch_size=16, show_progress=False)


# --- item 21: a buffer sized by the data, checked against memory -----------------------------------------------
def test_the_buffer_holds_at_most_the_corpus_plus_one_batch(glass):
    model, tokens = glass
    store = ActivationStore(model, tokens[:4], HOOK, batch_size=50_000, show_progress=False)
    n_rows = 4 * (CTX - 1)
    assert store.buffer_size == n_rows + 50_000  # was 16 x 50,000 = 800,000 rows (1.1 GB)
    next(store)
    assert store._buffer.shape == (n_rows + 50_000, 341)
    explicit = ActivationStore(model, tokens[:4], HOOK, batch_size=100, buffer_size=10**6, show_progress=False)
    assert explicit.buffer_size == n_rows + 100
    per_rank = ActivationStore(model, tokens, HOOK, batch_size=100, rank=1, world_size=4, show_progress=False)
    assert per_rank.buffer_size == 6 * (CTX - 1) + 100  # this rank's 6 windows


def test_a_buffer_that_cannot_fit_in_memory_is_refused_before_allocating(glass, monkeypatch):
    import sae_nb.config
    model, tokens = glass
    with pytest.raises(SaeNbError, match="use a smaller batch_size") as e:
        ActivationStore(model, tokens, HOOK, batch_size=10**11, show_progress=False)
    assert "bytes" in str(e.value) and "buffer_size" in str(e.value)
    monkeypatch.setattr(sae_nb.config, "_physical_memory", lambda: 100_000)  # a machine with 100 kB
    with pytest.raises(SaeNbError, match=r"would need [\d.e+]+ GB \([\d,]+ bytes\)"):
        ActivationStore(model, tokens, HOOK, batch_size=64, show_progress=False)


def test_sharding_and_exact_resume_are_unchanged_by_the_data_sized_buffer(glass):
    model, tokens = glass
    ranks = [one_pass(store_of(model, tokens, rank=r, world_size=3)) for r in range(3)]
    ref = hook_acts(model, tokens)[:, 1:]
    for r in range(3): torch.testing.assert_close(ranks[r], ref[r::3].reshape(-1, 341), atol=1e-5, rtol=0)
    # a state saved with the old default (16 x batch_size, more than 8 windows hold) resumes exactly in a new default store
    kw = dict(batch_size=40, seed=3, show_progress=False, model_batch_size=4)
    old = ActivationStore(model, tokens[:8], HOOK, **kw)
    old.buffer_size = 16 * 40; old.reset()  # what the old default gave (no cap by the data)
    for _ in range(7): next(old)
    state = json.loads(json.dumps(old.state_dict()))
    expected = torch.stack([next(old) for _ in range(6)])
    new = ActivationStore(model, tokens[:8], HOOK, **kw)
    assert new.buffer_size == 8 * (CTX - 1) + 40 < 16 * 40
    new.load_state_dict(state)
    assert new.buffer_size == 16 * 40
    assert torch.equal(torch.stack([next(new) for _ in range(6)]), expected)


# --- item 22: symbolic links ---------------------------------------------------------------------------------------
def test_save_cache_through_a_link_writes_the_folder_it_points_to(glass, tmp_path):
    model, tokens = glass
    store = store_of(model, tokens[:4])
    (tmp_path / "real").mkdir()
    (tmp_path / "lnk").symlink_to(tmp_path / "real")
    for overwrite in (False, True, True):  # later overwrites too
        store.save_cache(tmp_path / "lnk", overwrite=overwrite)
        assert (tmp_path / "lnk").is_symlink() and os.readlink(tmp_path / "lnk") == str(tmp_path / "real")
        assert (tmp_path / "real" / "metadata.json").is_file()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["lnk", "real"]  # no .lnk.old, no temporary folder
    cached = ActivationStore.from_cache(tmp_path / "lnk", batch_size=16, shuffle=False, loop=False, show_progress=False)
    store.reset()
    assert torch.equal(one_pass(cached), one_pass(store))


def test_cli_collect_into_a_linked_folder(tmp_path):
    from sae_nb.cli import main
    (tmp_path / "real").mkdir()
    (tmp_path / "lnk").symlink_to(tmp_path / "real")
    args = ["collect", "--model", "glassllm-en", "--hook", HOOK, "--corpus", "pydoc", "--context-size", "16",
            "--tokens", "60", "--device", "cpu", "--out", str(tmp_path / "lnk")]
    assert main(args) == 0
    assert (tmp_path / "lnk").is_symlink() and (tmp_path / "real" / "metadata.json").is_file()
    assert not (tmp_path / ".lnk.old").exists()


def test_a_link_left_aside_by_an_older_version_does_not_block_overwrites(glass, tmp_path):
    "Older versions renamed the user's link to .lnk.old and then failed on it: now only the link goes, never its target."
    model, tokens = glass
    store = store_of(model, tokens[:4])
    (tmp_path / "target").mkdir(); (tmp_path / "target" / "mine.txt").write_text("keep")
    store.save_cache(tmp_path / "lnk")  # a real folder, as the old swap left it
    (tmp_path / ".lnk.old").symlink_to(tmp_path / "target")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        store.save_cache(tmp_path / "lnk", overwrite=True)
    assert any("not touched" in str(x.message) for x in w)
    assert (tmp_path / "target" / "mine.txt").read_text() == "keep"
    assert not (tmp_path / ".lnk.old").exists() and (tmp_path / "lnk" / "metadata.json").is_file()


@pytest.fixture
def cache(glass, tmp_path):
    model, tokens = glass
    store_of(model, tokens[:4]).save_cache(tmp_path / "c")
    return tmp_path / "c"


@pytest.mark.parametrize("where", ["outside", "inside"])
def test_a_shard_that_is_a_symbolic_link_is_refused(cache, where):
    shard = cache / "shard_00000.safetensors"
    copy = (cache.parent if where == "outside" else cache) / "elsewhere.safetensors"
    shutil.copy(shard, copy)
    shard.unlink(); shard.symlink_to(copy)  # gets around the '../' check on shard names
    with pytest.raises(SaeNbError, match="symbolic link") as e:
        ActivationStore.from_cache(cache, batch_size=16, show_progress=False)
    assert str(shard) in str(e.value)


def test_metadata_that_is_a_symbolic_link_is_refused(cache):
    meta = cache / "metadata.json"
    outside = cache.parent / "metadata.json"
    shutil.copy(meta, outside); meta.unlink(); meta.symlink_to(outside)
    with pytest.raises(SaeNbError, match="symbolic link"):
        ActivationStore.from_cache(cache, batch_size=16, show_progress=False)


def test_from_cache_through_a_link_to_the_cache_folder(cache):
    (cache.parent / "lnk").symlink_to(cache)
    assert ActivationStore.from_cache(cache.parent / "lnk", batch_size=16, show_progress=False).n_tokens == 4 * (CTX - 1)


# --- item 14: damaged resume states fail fast, naming the field ------------------------------------------------
@pytest.fixture(scope="module")
def running(glass):
    "A looping store a few batches in, and its state through JSON."
    model, tokens = glass
    store = ActivationStore(model, tokens[:12], HOOK, batch_size=50, buffer_size=200, show_progress=False, model_batch_size=4)
    for _ in range(9): next(store)
    return store, json.loads(json.dumps(store.state_dict()))


@pytest.mark.parametrize("field, value", [
    ("rows_yielded", 1.28e12), ("rows_yielded", -50), ("rows_yielded", "450"), ("rows_yielded", None), ("rows_yielded", True),
    ("rows_yielded", 10**15), ("rows_yielded", 425), ("windows_added", 10**12), ("windows_added", 1), ("refills", 10**9),
    ("refills", 0), ("windows_added", 2.5),
], ids=str)
def test_a_damaged_state_counter_fails_fast_naming_the_field(running, field, value):
    store, state = running
    with within(8), pytest.raises(SaeNbError, match=f"{field}=") as e:
        store.load_state_dict(dict(state, **{field: value}))
    assert "damaged" in str(e.value) or "does not match a replay" in str(e.value)


def test_a_consistent_but_absurdly_long_replay_is_refused(running):
    "Counters that agree with each other but would take hours to replay (1.28e12 rows)."
    store, state = running
    rows = 50 * 25_600_000_000  # 1.28e12 rows, whole batches
    windows = -(-rows // 15)  # just enough windows (15 rows each) for those rows
    with within(8), pytest.raises(SaeNbError, match="rows_yielded=.*would take hours"):
        store.load_state_dict(dict(state, rows_yielded=rows, windows_added=windows, refills=windows // 10))


def test_a_single_pass_state_cannot_claim_more_windows_than_the_pass(glass):
    model, tokens = glass
    store = store_of(model, tokens[:6], batch_size=20)
    next(store)
    state = store.state_dict()
    with within(8), pytest.raises(SaeNbError, match="windows_added=7.*single pass"):
        store.load_state_dict(dict(state, windows_added=7))


def test_a_good_state_still_resumes_exactly_after_refusals(running, glass):
    model, tokens = glass
    store, state = running
    with within(8), pytest.raises(SaeNbError): store.load_state_dict(dict(state, rows_yielded=1.28e12))
    fresh = ActivationStore(model, tokens[:12], HOOK, batch_size=50, buffer_size=200, show_progress=False, model_batch_size=4)
    fresh.load_state_dict(state)
    store.load_state_dict(state)
    assert torch.equal(torch.stack([next(store) for _ in range(5)]), torch.stack([next(fresh) for _ in range(5)]))


# --- moved from the 03_activations lesson: a kill mid-overwrite, and damaged cache metadata --------------------
class Killed(BaseException):
    "Stands for a kill: not an Exception, so nothing in the package can catch it."


def test_a_kill_between_the_two_renames_of_an_overwrite_leaves_the_old_cache_readable(glass, tmp_path, monkeypatch):
    model, tokens = glass
    store, rpw = store_of(model, tokens), CTX - 1
    store.save_cache(tmp_path / "c", max_tokens=4 * rpw)
    real_replace = os.replace
    def replace_then_die(a, b):
        if Path(b) == tmp_path / "c": raise Killed  # the new folder's rename: the old cache is already moved aside
        real_replace(a, b)
    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(Killed): store.save_cache(tmp_path / "c", overwrite=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (tmp_path / "c").exists() and (tmp_path / ".c.old" / "metadata.json").is_file()
    with pytest.warns(UserWarning, match="interrupted"):
        old = ActivationStore.from_cache(tmp_path / "c", loop=False, show_progress=False)
    assert old.n_tokens == 4 * rpw  # the old cache, whole
    with pytest.raises(SaeNbError, match="overwrite=True"): store.save_cache(tmp_path / "c")  # the aside cache counts
    store.save_cache(tmp_path / "c", max_tokens=5 * rpw, overwrite=True)  # completes the swap
    assert ActivationStore.from_cache(tmp_path / "c", show_progress=False).n_tokens == 5 * rpw
    assert not (tmp_path / ".c.old").exists() and not list(tmp_path.glob(".c.*.tmp"))
    (tmp_path / "notes").mkdir(); (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(SaeNbError, match="todo.txt"): store.save_cache(tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def broken_copy(cache, edit):
    "A copy of `cache` beside it with `edit(metadata)` applied (metadata.json replaced by `edit` if it is a string)."
    bad = cache.parent / "bad"
    shutil.rmtree(bad, ignore_errors=True); shutil.copytree(cache, bad)
    m = json.loads((bad / "metadata.json").read_text())
    if isinstance(edit, str): (bad / "metadata.json").write_text(edit)
    else: edit(m); (bad / "metadata.json").write_text(json.dumps(m))
    return bad


@pytest.mark.parametrize("edit,problem", [
    (lambda m: m.pop("shards"), "'shards' is missing"), (lambda m: m.update(d_in="341"), "'d_in' is '341'"),
    (lambda m: m.update(exclude_bos=1), "'exclude_bos' is 1"), (lambda m: m.pop("hook_name"), "'hook_name' is missing"),
    (lambda m: m["shards"][0].update(rows="many"), "['rows'] is 'many'"),
    (lambda m: m["shards"][0].pop("file"), "['file'] is None"), ("[1, 2]", "holds a JSON list"),
    (lambda m: m.update(rows_per_window=30, n_windows=m["n_tokens"] // 30), "rows_per_window=30 contradicts"),
    (lambda m: m["shards"][0].update(file="../c/" + m["shards"][0]["file"]), "not a plain file name"),
    (lambda m: m["shards"][0].update(file="/tmp/" + m["shards"][0]["file"]), "not a plain file name"),
    (lambda m: m.update(dtype="float16"), "holds F32 values, metadata.json says dtype float16"),
    (lambda m: m.update(d_in=True), "save_cache(folder, overwrite=True)")])
def test_damaged_cache_metadata_is_one_error_naming_the_field(cache, edit, problem):
    with pytest.raises(SaeNbError) as e:
        ActivationStore.from_cache(broken_copy(cache, edit), show_progress=False)
    assert problem in str(e.value)


def test_a_shard_of_another_dtype_than_the_metadata_says_is_refused(cache):
    from sae_nb.config import load_safetensors_checked, save_safetensors_atomic
    bad = broken_copy(cache, lambda m: None)
    shard = bad / "shard_00000.safetensors"
    save_safetensors_atomic({"activations": load_safetensors_checked(shard)["activations"].int()}, shard)
    with pytest.raises(SaeNbError, match="holds I32 values"):
        ActivationStore.from_cache(bad, show_progress=False)
