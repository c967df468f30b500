"""Edges of SAE save/load (sae_nb.sae): damaged JSON in cfg.json and in the weights header, absurd sizes, two
processes saving side by side, and a fuzz of cfg.json values. The lesson-worthy behaviour (hook_z, float32
thresholds, BatchTopK's start, folding an input scale, permissions, links) is tested in nbs/04_sae.ipynb.
Run: `.venv/bin/python -m pytest -q tests/test_edges_sae.py`.
"""
import json, os, random, struct, subprocess, sys, textwrap
from pathlib import Path

import pytest
import torch

from sae_nb.config import SaeNbError
from sae_nb.config import check_fits_in_memory
from sae_nb.sae import SAE, SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SAEConfig

ROOT = Path(__file__).resolve().parents[1]


def small_sae(arch="jumprelu", **kw):
    cfg = SAEConfig(arch, 6, 10, k=2 if arch in ("topk", "batchtopk") else None, hook_name="blocks.0.mlp.hook_post", **kw)
    sae = SAE.from_config(cfg, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(): sae.b_dec.uniform_(-1, 1); sae.b_enc.uniform_(-0.1, 0.1)
    return sae.eval()


def split_safetensors(b):
    n = struct.unpack("<Q", b[:8])[0]
    return json.loads(b[8:8 + n]), b[8 + n:]


def join_safetensors(header, data):
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def with_header_cfg(folder, text):
    "Put `text` as the config stored in the weights header, and make cfg.json look like another save's (so load reads the header's)."
    w = folder / SAE_WEIGHTS_FILENAME
    header, data = split_safetensors(w.read_bytes())
    header["__metadata__"]["sae_nb_cfg"] = text
    w.write_bytes(join_safetensors(header, data))
    cfg = json.loads((folder / SAE_CFG_FILENAME).read_text())
    cfg["metadata"]["sae_nb_save_id"] = "another-save"
    (folder / SAE_CFG_FILENAME).write_text(json.dumps(cfg))


DEEP = "[" * 200_000 + "]" * 200_000
LONG_INT = '{"d_sae": 1' + "0" * 5000 + "}"


@pytest.mark.parametrize("text,problem", [(DEEP, "nested too deeply"), (LONG_INT, "cannot be read")], ids=["deep", "long-int"])
def test_malformed_json_in_cfg_json_is_a_clear_error(tmp_path, text, problem):
    folder = small_sae().save(tmp_path / "s")
    (folder / SAE_CFG_FILENAME).write_text(text)
    with pytest.raises(SaeNbError, match=problem) as e: SAE.load(folder)
    assert SAE_CFG_FILENAME in str(e.value)


@pytest.mark.parametrize("text,problem", [(DEEP, "nested too deeply"), (LONG_INT, "cannot be read"), ("{x", "not valid JSON")],
                         ids=["deep", "long-int", "invalid"])
def test_malformed_json_in_the_weights_header_is_a_clear_error(tmp_path, text, problem):
    "Before: RecursionError / ValueError from json.loads of the header's stored config."
    folder = small_sae().save(tmp_path / "s")
    with_header_cfg(folder, text)
    with pytest.raises(SaeNbError, match=problem) as e: SAE.load(folder)
    assert SAE_WEIGHTS_FILENAME in str(e.value) and "sae_nb_cfg" in str(e.value)


@pytest.mark.parametrize("d_in,d_sae", [(4096, 100_000_000), (10 ** 7, 10 ** 7)])
def test_an_sae_too_big_for_memory_is_refused_with_the_figure_before_allocating(d_in, d_sae):
    "Before: a multi-TB allocation traceback from torch (RuntimeError)."
    with pytest.raises(SaeNbError, match=r"d_sae=.*would need [0-9.e+]+ GB \([0-9,]+ bytes\) but this machine has [0-9.e+]+ GB"):
        SAE.from_config(SAEConfig("standard", d_in, d_sae))


def test_check_fits_in_memory_accepts_what_fits_and_names_what_does_not():
    check_fits_in_memory(1 << 20, "a buffer")
    with pytest.raises(SaeNbError, match="the cache need"): check_fits_in_memory(1 << 62, "the cache")


def test_a_cfg_json_with_an_absurd_size_is_refused_before_allocating(tmp_path):
    folder = small_sae().save(tmp_path / "s")
    cfg = json.loads((folder / SAE_CFG_FILENAME).read_text())
    for d_sae in (10 ** 30, -5, 2.5, "10"):
        (folder / SAE_CFG_FILENAME).write_text(json.dumps(dict(cfg, d_sae=d_sae)))
        with pytest.raises(SaeNbError, match="d_sae"): SAE.load(folder)


SAVER = textwrap.dedent("""
    import os, sys, time, torch
    from pathlib import Path
    from sae_nb.config import SaeNbError
    from sae_nb.sae import SAE, SAEConfig
    root, me, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    sae = SAE.from_config(SAEConfig("standard", 6, 10), generator=torch.Generator().manual_seed(int(me == "b")))
    (root / f"ready.{me}").touch()
    while not all((root / f"ready.{w}").exists() for w in "ab"): time.sleep(0.001)
    won = refused = 0
    for i in range(n):
        sae.save(root / f"own_{me}_{i}")  # siblings: never collide on temporary names
        sae.save(root / "shared", overwrite=True)  # the same folder, replaced by both
        try: sae.save(root / f"race_{i}"); won += 1  # the same new folder: one wins, the other is refused clearly
        except SaeNbError as e: assert "overwrite=True" in str(e), e; refused += 1
    print(won, refused)
""")


@pytest.mark.filterwarnings("ignore:.*was not written with")  # "shared": the two saves' files may interleave (handled by load)
def test_two_processes_saving_side_by_side_never_crash_on_each_other(tmp_path):
    n = 25
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    procs = [subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path), me, str(n)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for me in "ab"]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs): assert p.returncode == 0, err[-3000:]
    won = sum(int(out.split()[0]) for out, _ in outs)
    assert won == n  # each race folder was saved by exactly one of the two
    for i in range(n): SAE.load(tmp_path / f"race_{i}")
    SAE.load(tmp_path / "shared")
    for me in "ab":
        for i in range(n): SAE.load(tmp_path / f"own_{me}_{i}")
    assert not [q.name for q in tmp_path.iterdir() if q.name.startswith(".")]  # no temporary left behind


JSON_VALUES = [None, True, False, 0, -1, 1, 3, 10 ** 30, 1e308, float("nan"), 0.5, "", "x", "hook_z", "none",
               "blocks.0.attn.hook_z", "bfloat16", "float16", "jumprelu", "batchtopk", [], [1], {}, {"a": 1}]


@pytest.mark.parametrize("arch", ["standard", "topk", "batchtopk", "jumprelu"])
def test_fuzzed_cfg_json_values_load_a_working_sae_or_raise_a_clear_error(tmp_path, arch):
    "Every top-level and metadata field set to odd JSON values (2 at a time): SaeNbError naming the folder, or an SAE that runs."
    folder = small_sae(arch).save(tmp_path / "s")
    base = json.loads((folder / SAE_CFG_FILENAME).read_text())
    keys = [(k,) for k in base] + [("metadata", k) for k in base["metadata"] if k != "sae_nb_save_id"]  # (an id change: header's cfg)
    rng = random.Random(arch)
    for _ in range(150):
        cfg = json.loads(json.dumps(base))
        for _ in range(2):
            path, value = rng.choice(keys), rng.choice(JSON_VALUES)
            if len(path) == 2 and not isinstance(cfg["metadata"], dict): continue
            (cfg["metadata"] if len(path) == 2 else cfg)[path[-1]] = value
        (folder / SAE_CFG_FILENAME).write_text(json.dumps(cfg))
        try: sae = SAE.load(folder)
        except SaeNbError as e: assert str(folder) in str(e), str(e)
        else:
            assert sae.threshold.dtype == torch.promote_types(sae.dtype, torch.float32) if hasattr(sae, "threshold") else True
            x = torch.randn(3, sae.cfg.d_in)
            assert sae(x).shape == x.shape and sae.inference_l0(x).shape == ()


def test_a_kill_between_the_two_replaced_files_loads_the_new_sae_whole_with_a_warning(tmp_path, monkeypatch):
    "A save killed between replacing the weights and cfg.json (simulated: the `os.replace` of cfg.json fails) loads the new SAE, with a warning."
    import dataclasses, warnings
    def randomised(sae, seed):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in sae.parameters(): p.add_(torch.randn(p.shape, generator=g) * 0.1)
        return sae
    old = randomised(SAE.from_config(SAEConfig("standard", 16, 64, hook_name="blocks.0.mlp.hook_post")), 0)
    wide = randomised(SAE.from_config(dataclasses.replace(old.cfg, d_sae=80, hook_name="blocks.1.mlp.hook_post")), 7)
    folder = tmp_path / "killed"; old.save(folder)
    real_replace = os.replace
    def dies_before_cfg(a, b):
        if Path(b) == folder / SAE_CFG_FILENAME: raise OSError("killed before cfg.json was replaced")
        real_replace(a, b)
    monkeypatch.setattr(os, "replace", dies_before_cfg)
    with pytest.raises(OSError, match="killed"): wide.save(folder, overwrite=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert json.loads((folder / SAE_CFG_FILENAME).read_text())["d_sae"] == 64  # the old cfg.json is still there
    with pytest.warns(UserWarning, match="interrupted"): got = SAE.load(folder)
    x = torch.randn(4, 5, 16)
    assert got.cfg == wide.cfg and torch.equal(got(x), wide(x))  # the new SAE whole, not a mix of the two
    wide.save(folder, overwrite=True)  # the next save makes the folder consistent: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SAE.load(folder).cfg == wide.cfg
