"""`train_sae`'s WHOLE step (loop, statistics, clipping, scheduler, Adam, decoder-norm hooks) against its floor, in one process.

Run from the repository root (no timing is asserted; this prints):

    .venv/bin/python bench/bench_step.py --arch standard --d-sae 6144 12288 --batch 4096 1024
    .venv/bin/python bench/bench_step.py --arch topk --d-sae 12288 --batch 4096
    .venv/bin/python bench/bench_step.py --arch standard --pkg /tmp/i14/before   # also time another copy of sae_nb (A/B)

What is timed: `train_sae(data, sae, TrainConfig(steps=S, ...))` with its defaults (grad clipping, lr schedule, fired
counters, metric sums, NaN checks) except `b_dec_init=None` (no set-up work), on a random [S * batch, d_in] tensor;
the step time is the time between consecutive `_Trainer.take_step` starts (the loop's own work included), median over
the steps that are not a logging step. The floor, timed right before and after each run in the same process:
  standard: the six [batch x d_in x d_sae] GEMMs of a textbook step (encoder/decoder forward, two backward GEMMs each);
  topk:     the encoder GEMM plus `torch.topk(k)` over its output.
Variants (this package, and `--pkg` copies) are interleaved A B A B ... ; each printed ratio is the median over the
rounds of (step / the mean of the floor timed just before and just after it), with the 1-minute load average.
--autocast bfloat16 times TrainConfig(autocast_dtype="bfloat16") (its floor stays the float32 GEMMs).
"""
import argparse, importlib, os, statistics, sys, time, warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def load1() -> float: return os.getloadavg()[0]


def gemm_rate(B=4096, d_in=1536, d_sae=6144) -> float:
    "float32 GFLOP/s of one [B x d_in x d_sae] GEMM, best of 3, in this process."
    x, W = torch.randn(B, d_in), torch.randn(d_in, d_sae)
    x @ W
    best = min(_t(lambda: x @ W) for _ in range(3))
    return 2 * B * d_in * d_sae / best / 1e9


def _t(fn) -> float:
    t = time.perf_counter(); fn(); return time.perf_counter() - t


def _tc(fn) -> tuple:
    "(wall, CPU seconds of this process) of one call."
    t, c = time.perf_counter(), time.process_time(); fn(); return time.perf_counter() - t, time.process_time() - c


def floor_fn(arch, B, d_in, d_sae, k):
    "A function running the step's floor once (see the module docstring)."
    g = torch.Generator().manual_seed(1)
    x, gx = torch.randn(B, d_in, generator=g), torch.randn(B, d_in, generator=g)
    W_enc, W_dec = torch.randn(d_in, d_sae, generator=g), torch.randn(d_sae, d_in, generator=g)
    if arch == "standard":
        f, gf = torch.randn(B, d_sae, generator=g).relu(), torch.randn(B, d_sae, generator=g)
        def run():
            x @ W_enc; f @ W_dec; gx @ W_dec.T; f.T @ gx; x.T @ gf; gf @ W_enc.T
    else:
        def run():
            torch.topk(x @ W_enc, k, dim=-1, sorted=False)
    return run


def step_times(pkg, arch, B, d_in, d_sae, k, steps, autocast=None, sae=None):
    "Per-step wall times of one `train_sae` run of `pkg` (the time between take_step starts; the last, logging, step left out)."
    sae_mod, train = importlib.import_module(f"{pkg}.sae"), importlib.import_module(f"{pkg}.train")
    if sae is None:
        cfg = sae_mod.SAEConfig(arch, d_in=d_in, d_sae=d_sae, k=k if arch in ("topk", "batchtopk", "matryoshka_batchtopk") else None,
                                **({"matryoshka_widths": [d_sae // 4, d_sae]} if arch == "matryoshka_batchtopk" else {}))
        sae = sae_mod.SAE.from_config(cfg, generator=torch.Generator().manual_seed(0))
    data = (torch.randn(steps * B, d_in, generator=torch.Generator().manual_seed(2)) * 0.5).relu()
    stamps, orig = [], train._Trainer.take_step
    def stamped(self, *a, **kw):
        stamps.append((time.perf_counter(), time.process_time())); return orig(self, *a, **kw)
    train._Trainer.take_step = stamped
    extra = {"autocast_dtype": autocast} if autocast else {}
    try:
        train.train_sae(data, sae, train.TrainConfig(batch_size=B, steps=steps, b_dec_init=None, show_progress=False, log_every=10_000, **extra))
    finally: train._Trainer.take_step = orig
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:])], sae


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="standard", help="standard | topk | batchtopk | matryoshka_batchtopk")
    p.add_argument("--d-in", type=int, default=1536)
    p.add_argument("--d-sae", type=int, nargs="+", default=[12288])
    p.add_argument("--batch", type=int, nargs="+", default=[4096])
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=4, help="steps per train_sae run (the first is a warm-up, the last logs)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pkg", nargs="*", default=[], help="folders holding another copy of the package (e.g. /tmp/i14/before with sae_nb_before/)")
    p.add_argument("--autocast", default=None, help="also time TrainConfig(autocast_dtype=...) of this package")
    p.add_argument("--target", type=float, default=None, help="the target ratio to print PASS/MISS against")
    a = p.parse_args(argv)
    pkgs = ["sae_nb"]
    for folder in a.pkg:
        sys.path.insert(0, folder)
        pkgs += [n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n, "__init__.py"))]
    variants = [(pk, None) for pk in pkgs] + ([("sae_nb", a.autocast)] if a.autocast else [])
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, load {load1():.2f}; "
          f"GEMM rate {gemm_rate():.0f} GFLOP/s (4096x1536x6144 float32, this process)", flush=True)
    floor_name = "six GEMMs" if a.arch == "standard" else f"encoder GEMM + topk(k={a.k})"
    for d_sae in a.d_sae:
        for B in a.batch:
            floor = floor_fn("standard" if a.arch == "standard" else "topk", B, a.d_in, d_sae, a.k)
            floor()
            ratios = {v: [] for v in variants}; cratios = {v: [] for v in variants}; secs = {v: [] for v in variants}; floors, loads = [], []
            saes = {v: None for v in variants}
            f_prev = _tc(floor)
            for r in range(a.rounds):
                order = variants if r % 2 == 0 else variants[::-1]
                for v in order:
                    ts, saes[v] = step_times(v[0], a.arch, B, a.d_in, d_sae, a.k, a.steps, v[1], None)
                    f_next = _tc(floor)
                    ts = ts[1:] if len(ts) > 1 else ts  # the first step: warm-up (Adam state, first calls)
                    st, sc = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
                    ratios[v].append(st / ((f_prev[0] + f_next[0]) / 2)); cratios[v].append(sc / ((f_prev[1] + f_next[1]) / 2))
                    secs[v].append(st); floors.append(f_next[0]); f_prev = f_next
                    loads.append(load1())
            print(f"\n{a.arch} {a.d_in} x {d_sae}, batch {B}: floor ({floor_name}) median {statistics.median(floors):.3f} s "
                  f"[{min(floors):.3f}-{max(floors):.3f}], load {min(loads):.2f}-{max(loads):.2f}")
            for v in variants:
                rs = ratios[v]; m = statistics.median(rs)
                tgt = f"  target <= {a.target}: {'PASS' if m <= a.target else 'MISS'}" if a.target else ""
                name = v[0] + (f" autocast {v[1]}" if v[1] else "")
                print(f"  {name:<28} step {statistics.median(secs[v]):.3f} s, {B / statistics.median(secs[v]):7.0f} tok/s; "
                      f"step / floor median {m:.3f} [{', '.join(f'{x:.3f}' for x in rs)}] (CPU time: {statistics.median(cratios[v]):.3f}){tgt}", flush=True)


if __name__ == "__main__":
    main()
