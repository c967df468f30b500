"""Benchmark of one SAE training step (sae_nb) against the GEMM limit and against SAELens, all in one process.

Run from the repository root (each about 2-3 minutes on 2 shared CPU cores; no timing is asserted, this prints):

    .venv/bin/python bench/bench_train.py --part ratios --saelens-sparse     # d_in 1536, d_sae 12288, 4096 tokens
    .venv/bin/python bench/bench_train.py --part ratios --d-in 2048 --d-sae 16384
    .venv/bin/python bench/bench_train.py --part loop                        # train_sae's own per-step overhead

--part ratios, on one [batch, d_in] float32 tensor:
  (1) the six GEMMs of a textbook standard-SAE step, each [batch x d_in x d_sae] in the layout autograd uses
      (encoder and decoder forward; decoder backward for f and W_dec; encoder backward for W_enc and for its input);
  (2) our step: `sae.training_loss` -> backward -> `on_before_optimizer_step` -> Adam step -> `on_after_optimizer_step`
      -> zero_grad, for `standard` (ReLU + L1) and `topk` (k=--k: the sparse training path), with torch's default
      Adam as `train_sae` builds it on CPU (--fused-adam: fused Adam on both sides);
  (3) SAELens' step on the same tensor, same architecture and width: its training SAE's `training_forward_pass`
      -> backward -> Adam step -> zero_grad (`StandardTrainingSAE`, `TopKTrainingSAE` with its defaults; with
      --saelens-sparse also `TopKTrainingSAE(use_sparse_activations=True, rescale_acts_by_decoder_norm=False)`).
  Each repeat runs the GEMMs, the steps in order, the GEMMs again, the steps in reverse order. The figures are
  ratios of best-of times (the least disturbed run of each, as the other benches report), in wall-clock and in CPU
  time; beside them, each repeat's ratio of the means of its two timings (a load drifting linearly cancels).
  Targets: standard step / six GEMMs <= 1.10; tokens/s vs SAELens >= 1.0 (standard) and >= 2.0 (topk).
--part loop: `train_sae` for --loop-steps steps (standard, then topk) with the SAE's own calls timed from inside
  (training_loss, backward, the two hooks, the optimizer step), so the loop's own work per step is the rest of the
  wall time between the first and the last step's start; then SAELens' `SAETrainer.step` (its whole per-step work:
  forward, firing statistics, backward, grad clipping, Adam, schedulers) for a trainer-level comparison (timed after
  train_sae, not interleaved: a rough figure on a shared machine).
On a shared machine wall-clock timings follow the neighbours' load; CPU seconds of this process, printed beside
them, measure the work done more steadily.
"""
import argparse, os, platform, shlex, statistics, sys, time, warnings
from collections import defaultdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook


def timed(fn) -> tuple:
    "(wall seconds, CPU seconds of this process) of one call of fn."
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def med(xs) -> str:
    "median [min-max] of a list of numbers."
    return f"{statistics.median(xs):.3g} [{min(xs):.3g}-{max(xs):.3g}]" if len(xs) > 1 else f"{xs[0]:.3g}"


def machine() -> str:
    "CPU model, CPU count, load average, torch version and threads, in one line."
    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration): pass
    load = f"load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{model}, {os.cpu_count()} CPUs, {load}; torch {torch.__version__}, {torch.get_num_threads()} threads"


# ---- the contenders -----------------------------------------------------------------------------------------------

def ours(arch, a, g):
    "(sae, step function) for sae_nb's SAE of `arch` with a default (foreach) Adam, as train_sae builds it on CPU."
    from sae_nb.sae import SAE, SAEConfig
    sae = SAE.from_config(SAEConfig(arch, d_in=a.d_in, d_sae=a.d_sae, k=a.k if arch == "topk" else None), generator=g)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=a.fused_adam or None)
    dead = torch.zeros(a.d_sae, dtype=torch.bool)
    dead[: int(a.dead_fraction * a.d_sae)] = True

    def step(x):
        out = sae.training_loss(x, 1e-3, dead_mask=dead if arch == "topk" else None)
        out["loss"].backward()
        sae.on_before_optimizer_step()
        opt.step()
        sae.on_after_optimizer_step()
        opt.zero_grad(set_to_none=True)
    return sae, step


def saelens(arch, a, sparse=False):
    "Step function of SAELens' training SAE of `arch` (its defaults) + torch Adam, as SAETrainer builds them."
    from sae_lens.saes.sae import TrainStepInput
    if arch == "standard":
        from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=a.d_in, d_sae=a.d_sae, l1_coefficient=1e-3))
        coefficients = {"l1": 1e-3}
    else:
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
        # use_sparse_activations with the default rescale_acts_by_decoder_norm=True fails in backward on CPU in sae-lens
        # 6.54 (aten::view on a sparse tensor), so the sparse variant runs without the rescale, as ours (unit rows)
        kw = dict(use_sparse_activations=True, rescale_acts_by_decoder_norm=False) if sparse else {}
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=a.d_in, d_sae=a.d_sae, k=a.k, **kw))
        coefficients = {}
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=a.fused_adam or None)
    dead = torch.zeros(a.d_sae, dtype=torch.bool)
    dead[: int(a.dead_fraction * a.d_sae)] = True

    def step(x):
        sae.train()
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coefficients, dead_neuron_mask=dead,
                                                       n_training_steps=0, is_logging_step=False))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return sae, step


def six_gemms(a, rows=None):
    "The six [batch x d_in x d_sae] GEMMs of a textbook standard step, in autograd's layouts: name -> fn (run once if `rows`)."
    g = torch.Generator().manual_seed(1)
    B, d_in, d_sae = rows or a.batch, a.d_in, a.d_sae
    x, gx = torch.randn(B, d_in, generator=g), torch.randn(B, d_in, generator=g)
    f, gf = torch.randn(B, d_sae, generator=g), torch.randn(B, d_sae, generator=g)
    W_enc, W_dec = torch.randn(d_in, d_sae, generator=g), torch.randn(d_sae, d_in, generator=g)
    fns = {"enc fwd  x@W_enc": lambda: x @ W_enc, "dec fwd  f@W_dec": lambda: f @ W_dec,
           "dec bwd  g@W_dec.T": lambda: gx @ W_dec.T, "dec bwd  f.T@g": lambda: f.T @ gx,
           "enc bwd  x.T@G": lambda: x.T @ gf, "enc bwd  G@W_enc.T": lambda: gf @ W_enc.T}
    if rows:
        for fn in fns.values(): fn()
    return fns


# ---- part: ratios -------------------------------------------------------------------------------------------------

def part_ratios(a):
    from sae_nb.config import seed_everything
    g = seed_everything(0)
    x = (torch.randn(a.batch, a.d_in, generator=g) * 0.5).relu()  # stands in for MLP activations; values do not change the work
    gemms = six_gemms(a)
    runs = {}
    for arch in a.archs:
        runs[f"ours {arch}"], runs[f"SAELens {arch}"] = ours(arch, a, g)[1], saelens(arch, a)[1]
    if a.saelens_sparse and "topk" in a.archs: runs["SAELens topk sparse"] = saelens("topk", a, sparse=True)[1]
    warm = x[: max(a.batch // 16, 1)]
    t0 = time.perf_counter()
    six_gemms(a, rows=warm.shape[0])  # warm-up at 1/16 of the rows: BLAS threads, first-call costs, Adam state
    for fn in runs.values(): fn(warm)
    print(f"warm-up {time.perf_counter() - t0:.0f} s")
    S = defaultdict(list)  # name -> [(wall, cpu)], every timing; "six GEMMs" is one set of the six
    pairs = defaultdict(list)  # name -> per repeat, the mean of its in-order and reversed timings
    for r in range(a.repeats):  # GEMMs, steps in order, GEMMs, steps in reverse order
        for half, order in enumerate((list(runs), list(reversed(runs)))):
            sets = [timed(fn) for fn in gemms.values()]
            S["six GEMMs"].append(tuple(sum(t[i] for t in sets) for i in (0, 1)))
            for n, t in zip(gemms, sets): S[n].append(t)
            for name in order: S[name].append(timed(lambda: runs[name](x)))
        for name in list(runs) + ["six GEMMs"]:
            pairs[name].append(tuple((u + v) / 2 for u, v in zip(S[name][-2], S[name][-1])))
        print(f"repeat {r + 1} (s, wall; first/second timing): " + ", ".join(
            f"{n} {S[n][-2][0]:.2f}/{S[n][-1][0]:.2f}" for n in list(runs) + ["six GEMMs"]), flush=True)
    best = {n: tuple(min(t[i] for t in v) for i in (0, 1)) for n, v in S.items()}
    flops = 2 * a.batch * a.d_in * a.d_sae
    print(f"\nbare GEMMs, {a.batch} x {a.d_in} x {a.d_sae} float32: best of {len(S['six GEMMs'])} (s, wall | CPU)")
    for n in gemms:
        print(f"  {n:<22} {best[n][0]:7.2f} | {best[n][1]:7.2f}   {flops / best[n][0] / 1e9:6.1f} GFLOP/s")
    print(f"  {'six, best set':<22} {best['six GEMMs'][0]:7.2f} | {best['six GEMMs'][1]:7.2f}")
    print(f"\ntraining step: best of {len(S['six GEMMs'])} (s, wall | CPU), tokens/s from the best wall time; all wall timings")
    for n in runs:
        print(f"  {n:<22} {best[n][0]:7.2f} | {best[n][1]:7.2f}   {a.batch / best[n][0]:7.0f} tok/s   "
              f"[{', '.join(f'{t[0]:.2f}' for t in S[n])}]")
    verdict = lambda ok: "PASS" if ok else "MISS"
    def show(label, num, den, target=None, op=None, note=""):
        "best-of ratio (wall | CPU) and the per-repeat ratios of the A/B means (wall)."
        bw, bc = best[num][0] / best[den][0], best[num][1] / best[den][1]
        per = [p[0] / q[0] for p, q in zip(pairs[num], pairs[den])]
        tgt = f"  target {op} {target}: {verdict(bw <= target if op == '<=' else bw >= target)}" if target else ""
        print(f"  {label:<38} {bw:6.3f} | {bc:6.3f}   per repeat {', '.join(f'{v:.3f}' for v in per)}{tgt}{note}")
    print(f"\nratios: best-of (wall | CPU), then per repeat (wall, A/B means)")
    if "standard" in a.archs:
        show("standard step / six GEMMs", "ours standard", "six GEMMs", 1.10, "<=")
        # the five GEMMs our step runs: each set of six less its encoder-input-gradient GEMM
        S["five GEMMs"] = [tuple(u - v for u, v in zip(six, g6)) for six, g6 in zip(S["six GEMMs"], S["enc bwd  G@W_enc.T"])]
        best["five GEMMs"] = tuple(min(t[i] for t in S["five GEMMs"]) for i in (0, 1))
        pairs["five GEMMs"] = [tuple((u + v) / 2 for u, v in zip(S["five GEMMs"][2 * r], S["five GEMMs"][2 * r + 1])) for r in range(a.repeats)]
        show("standard step / its five GEMMs", "ours standard", "five GEMMs", note="  (b_dec's gradient: a GEMV, not a sixth GEMM)")
        show("SAELens standard step / six GEMMs", "SAELens standard", "six GEMMs")
        show("tokens/s ours / SAELens, standard", "SAELens standard", "ours standard", 1.0, ">=")
    if "topk" in a.archs:
        show("tokens/s ours / SAELens, topk", "SAELens topk", "ours topk", 2.0, ">=")
        if "SAELens topk sparse" in runs:
            show("  vs SAELens topk use_sparse_activations", "SAELens topk sparse", "ours topk")
        show("ours topk step / six GEMMs", "ours topk", "six GEMMs")


# ---- part: loop ---------------------------------------------------------------------------------------------------

class SaeCallTimer:
    "Times the SAE's own calls inside train_sae: training_loss, Tensor.backward, the hooks, optimizer steps."
    def __init__(self, sae):
        self.calls = []  # (kind, start, end), in order
        self.sae, self._undo = sae, []

    def _wrap(self, obj, name, kind):
        orig = getattr(obj, name)
        def wrapper(*args, **kw):
            t = time.perf_counter()
            try: return orig(*args, **kw)
            finally: self.calls.append((kind, t, time.perf_counter()))
        setattr(obj, name, wrapper)
        self._undo.append(lambda: setattr(obj, name, orig) if obj is not torch.Tensor else setattr(torch.Tensor, name, orig))

    def __enter__(self):
        self._wrap(self.sae, "training_loss", "training_loss")
        self._wrap(self.sae, "on_before_optimizer_step", "hooks")
        self._wrap(self.sae, "on_after_optimizer_step", "hooks")
        self._wrap(torch.Tensor, "backward", "backward")
        starts = {}
        pre = register_optimizer_step_pre_hook(lambda opt, *a: starts.__setitem__(id(opt), time.perf_counter()))
        post = register_optimizer_step_post_hook(
            lambda opt, *a: self.calls.append(("optimizer", starts.pop(id(opt)), time.perf_counter())))
        self._undo += [pre.remove, post.remove]
        return self

    def __exit__(self, *exc):
        for undo in reversed(self._undo): undo()

    def per_step(self):
        "(wall seconds per step between the first and the last training_loss start, {kind: seconds per step}) over those steps."
        starts = [s for k, s, _ in self.calls if k == "training_loss"]
        if len(starts) < 2: return None, {}
        t0, t1, n = starts[0], starts[-1], len(starts) - 1
        parts = defaultdict(float)
        for k, s, e in self.calls:
            if t0 <= s < t1: parts[k] += (e - s) / n
        return (t1 - t0) / n, dict(parts)


def part_loop(a):
    from sae_nb.config import seed_everything
    from sae_nb.sae import SAE, SAEConfig
    from sae_nb.train import TrainConfig, train_sae
    g = seed_everything(0)
    S = a.loop_steps
    data = (torch.randn(S * a.batch, a.d_in, generator=g) * 0.5).relu()
    print(f"train_sae, {S} steps of {a.batch} tokens from a [{S * a.batch}, {a.d_in}] tensor (defaults: grad clipping, "
          f"geometric-median b_dec init, log at the last step), and SAELens' SAETrainer.step on the same batches")
    for arch in a.archs:
        sae = SAE.from_config(SAEConfig(arch, d_in=a.d_in, d_sae=a.d_sae, k=a.k if arch == "topk" else None), generator=g)
        tc = TrainConfig(batch_size=a.batch, steps=S, log_every=S, show_progress=False, device="cpu", lr_warmup_steps=0,
                         l1_coefficient=1e-3, seed=0)
        with SaeCallTimer(sae) as timer:
            total, total_cpu = timed(lambda: train_sae(data, sae, tc))
        step, parts = timer.per_step()
        own = sum(parts.values())
        print(f"\n  {arch}: train_sae total {total:.1f} s wall ({total_cpu:.1f} s CPU) for {S} steps; "
              f"per step (steps 1..{S - 1}, start to start) {step:.2f} s = {a.batch / step:.0f} tok/s")
        for k in ("training_loss", "backward", "hooks", "optimizer"):
            print(f"    {k:<15} {parts.get(k, 0):7.3f} s  {100 * parts.get(k, 0) / step:5.1f}%")
        print(f"    {'loop itself':<15} {step - own:7.3f} s  {100 * (step - own) / step:5.1f}%   (batching, stats, clipping, scheduler, checks)")
        print(f"    setup (SAE to device, b_dec init) + final log, outside the steps: about {total - step * S:.1f} s")
        if not a.saelens_steps: continue
        # SAELens' trainer-level step on the same batches, half before and half after a short train_sae run
        from sae_lens import SAETrainer
        from sae_lens.config import SAETrainerConfig
        if arch == "standard":
            from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
            sl_sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=a.d_in, d_sae=a.d_sae, l1_coefficient=1e-3))
        else:
            from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
            sl_sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=a.d_in, d_sae=a.d_sae, k=a.k))
        trainer = SAETrainer(cfg=SAETrainerConfig(total_training_samples=S * a.batch, train_batch_size_samples=a.batch, lr=1e-4, lr_end=1e-4),
                             sae=sl_sae, data_provider=iter(()))
        trainer.step(data[: a.batch // 16])  # warm-up (Adam state)
        sl = [timed(lambda i=i: trainer.step(data[(i % S) * a.batch:(i % S + 1) * a.batch]))[0] for i in range(a.saelens_steps)]
        print(f"    SAELens SAETrainer.step: {med(sl)} s per step = {a.batch / statistics.median(sl):.0f} tok/s; "
              f"tokens/s train_sae / SAETrainer = {statistics.median(sl) / step:.2f} (timed after train_sae, not interleaved)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("ratios", "loop"), default="ratios")
    p.add_argument("--d-in", type=int, default=1536)
    p.add_argument("--d-sae", type=int, default=12288)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dead-fraction", type=float, default=0.0, help="topk: fraction of features marked dead (AuxK on), for both")
    p.add_argument("--saelens-sparse", action="store_true", help="also time SAELens TopK with use_sparse_activations=True")
    p.add_argument("--fused-adam", action="store_true", help="use torch's fused Adam (CPU) for both sides")
    p.add_argument("--archs", default="standard,topk", help="comma-separated: standard, topk")
    p.add_argument("--loop-steps", type=int, default=3)
    p.add_argument("--saelens-steps", type=int, default=1, help="SAETrainer.step calls timed in --part loop (0: none)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a = p.parse_args(argv)
    a.archs = [x for x in a.archs.split(",") if x]
    if not set(a.archs) <= {"standard", "topk"} or not a.archs: p.error("--archs takes standard and/or topk")
    if a.threads: torch.set_num_threads(a.threads)
    print("command:", shlex.join([sys.executable] + sys.argv))
    print(time.strftime("%Y-%m-%d %H:%M"), "|", machine())
    t0 = time.perf_counter()
    (part_ratios if a.part == "ratios" else part_loop)(a)
    print(f"\n{machine()} at the end; bench time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
