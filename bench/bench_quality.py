"""Quality at an equal budget: sae_nb's `train_sae` vs SAELens' `SAETrainer`, on the same activations, in one process.

Run from the repository root (no figure is asserted; this prints):

    .venv/bin/python bench/bench_quality.py --part frontier       # topk k in --ks and standard at --l1-ours/--l1-saelens
    .venv/bin/python bench/bench_quality.py --part ablate         # our topk k=--ablate-k defaults, one change at a time
    .venv/bin/python bench/bench_quality.py --part ablate --architecture standard --ablations saelens,none,no_sched,b_dec_none,b_dec_none+no_sched
                                                                  # the same for standard (ReLU + L1) at each --ablate-l1
    .venv/bin/python bench/bench_quality.py --quick               # a smoke run at tiny shapes (2-7 minutes; figures mean nothing)

What it does:
  1. Collects `--steps` x `--batch-size` activation rows of `blocks.0.mlp.hook_post` (d_in 1536) of the embedded
     SmolLM2-135M on the embedded "pydoc" corpus ONCE (windows of 128 tokens, BOS column left out, shuffled in
     `ActivationStore`'s buffer), as a list of batches. Every run, ours and SAELens', trains on exactly these batches
     in this order (ours: `train_sae(list_of_batches, ...)`; SAELens: `SAETrainer(..., data_provider=iter(batches))`).
  2. Shared budget: width (`--width` x d_in), batch, steps, learning rate; everything else at each library's
     defaults: ours `TrainConfig(batch_size, steps, lr)` (geometric-median b_dec, lr warm-up 100 steps, decay over the
     last 20%, grad clip 1.0, L1 warm-up 5% for standard), SAELens `SAETrainerConfig(total_training_samples,
     train_batch_size_samples, lr)` (constant lr, clip 1.0) and `TopKTrainingSAEConfig(k)` /
     `StandardTrainingSAEConfig(l1_coefficient)` (decoder rows initialised to norm 0.1 and left free;
     `rescale_acts_by_decoder_norm=True` for TopK; b_dec zero).
  3. Scores every SAE on the same `--eval-tokens` held-out tokens (windows after the training windows) through the
     FULL 30-layer model: one clean and one zero-ablation forward per batch of windows, then one spliced forward per
     SAE, started from `blocks.0.hook_resid_pre` (as `sae_nb.eval.evaluate` does; `--check-eval` compares one SAE's
     figures with `evaluate`'s). Metrics at non-BOS positions: L0, explained variance (1 - SSE / total variance),
     loss recovered ((CE_zero - CE_sae) / (CE_zero - CE_clean)), KL(clean || spliced). Per-window KL sums are kept,
     so each KL difference gets a PAIRED standard error over windows (the windows are the independent units; the
     per-token SE, which ignores correlation inside a window, is printed beside it).
  Standard SAEs: the two libraries' L1 coefficients mean different things (our decoder rows are unit norm, SAELens'
  are free and start at 0.1), so each side gets its own list; at every SAELens point inside our L0 range, our KL and
  loss recovered are interpolated linearly in log L0 between our two nearest points ("matched L0" rows).
--part ablate: our topk at k=--ablate-k, defaults, then one change at a time (b_dec init, lr warm-up, decay,
  clipping, encoder init scale, AuxK window and coefficient, lr), plus SAELens' default, all scored together.
  `--architecture standard`: the same ablations for the standard (ReLU + L1) SAE, each at every coefficient of
  `--ablate-l1` (ours) and SAELens' at every one of `--ablate-l1-saelens` (the two libraries' coefficients mean
  different things, see above). A schedule change moves L0 as well as fidelity, so besides the raw rows (KL paired
  against the first SAELens row, at whatever L0 each has), each variant's loss recovered and KL are interpolated in
  log L0 between its own two nearest points at every SAELens L0 and at our defaults' L0s ("matched L0" table).
  The `train_sae` calls run on `--pkg` if given (a copy of `sae_nb` at a known commit, put first on sys.path).
Wall and CPU seconds of each training run are printed; the machine is shared, so the load (`uptime`) is printed at
each stage, and a 4096x1536x6144 float32 GEMM rate is measured at the start (and the end) as the machine's yardstick.
"""
import argparse, math, os, platform, sys, time, warnings

if "--pkg" in sys.argv:  # a copy of the package at a known commit, ahead of the working tree's
    sys.path.insert(0, sys.argv[sys.argv.index("--pkg") + 1])
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
import numpy as np
import torch
import torch.nn.functional as F


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "?"


def machine() -> str:
    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration): pass
    return f"{model}, {os.cpu_count()} CPUs; torch {torch.__version__}, {torch.get_num_threads()} threads"


def gemm_rate(m=4096, k=1536, n=6144, repeats=3) -> float:
    "Best-of GFLOP/s of one [m x k] @ [k x n] float32 matmul."
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')} load {load()}]", *a, flush=True)


# ---------------------------------------------------------------- data
def collect(model1, tokens, hook, batch_size, steps, seed=0):
    "`steps` shuffled [batch_size, d_in] batches of the hook's activations (one pass of ActivationStore over `tokens`)."
    from sae_nb.activations import ActivationStore
    store = ActivationStore(model1, tokens, hook, batch_size=batch_size, loop=False, seed=seed, show_progress=False)
    batches = []
    for b in store:
        batches.append(b.clone())
        if len(batches) == steps: break
    if len(batches) < steps: raise SystemExit(f"only {len(batches)} batches of {batch_size} rows; need {steps}: use fewer steps")
    return batches


# ---------------------------------------------------------------- training
def train_ours(batches, arch, d_in, d_sae, lr, seed=0, k=None, l1=None, enc_scale=None, **tc_over):
    "sae_nb: `train_sae` on the batches; returns (sae, wall s, cpu s, history)."
    from sae_nb.sae import SAE, SAEConfig
    from sae_nb.train import TrainConfig, train_sae
    from sae_nb.config import seed_everything
    sae_over = {key: tc_over.pop(key) for key in list(tc_over) if key in ("aux_loss_coefficient",)}
    cfg = SAEConfig(architecture=arch, d_in=d_in, d_sae=d_sae, k=k, **sae_over)
    tc = dict(batch_size=batches[0].shape[0], steps=len(batches), lr=lr, seed=seed, show_progress=False, log_every=len(batches))
    if l1 is not None: tc["l1_coefficient"] = l1
    tc.update(tc_over)
    sae_or_cfg = cfg
    if enc_scale is not None:  # same init as train_sae's, then the encoder scaled
        sae_or_cfg = SAE.from_config(cfg, generator=seed_everything(seed))
        with torch.no_grad(): sae_or_cfg.W_enc.mul_(enc_scale)
    w, c = time.perf_counter(), time.process_time()
    sae, hist = train_sae(batches, sae_or_cfg, TrainConfig(**tc))
    return sae, time.perf_counter() - w, time.process_time() - c, hist


def train_saelens(batches, arch, d_in, d_sae, lr, seed=0, k=None, l1=None, **sae_over):
    "SAELens: `SAETrainer.fit` on the batches, its defaults otherwise; returns (sae, wall s, cpu s, None)."
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    torch.manual_seed(seed)
    if arch == "topk": sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, dtype="float32", device="cpu", **sae_over))
    else: sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=l1, dtype="float32", device="cpu", **sae_over))
    B = batches[0].shape[0]
    cfg = SAETrainerConfig(total_training_samples=B * len(batches), train_batch_size_samples=B, lr=lr, lr_end=lr / 10,
                           device="cpu")  # lr_end: the runner config's default (used by cosine schedules only)
    trainer = SAETrainer(cfg, sae, iter(batches))
    w, c = time.perf_counter(), time.process_time()
    with open(os.devnull, "w") as null:  # its tqdm bar
        old, sys.stderr = sys.stderr, null
        try: trainer.fit()
        finally: sys.stderr = old
    sae.eval()
    return sae, time.perf_counter() - w, time.process_time() - c, None


# ---------------------------------------------------------------- scoring
@torch.inference_mode()
def score(model, saes: dict, tokens, hook, batch_windows=8):
    """Per-window sums for every SAE on `tokens` through the full model: dict name -> arrays (kl, n, ce, n_loss, sse,
    l0), plus 'clean'/'zero' CE per window and the activations' variance sums for EV."""
    from sae_nb.data import bos_token_id, counted_positions
    bos = bos_token_id(model)
    resid_name = "blocks.0.hook_resid_pre"
    out = {name: dict(kl=[], ce=[], sse=[], l0=[]) for name in saes}
    clean_ce, zero_ce, n_tok, n_loss, xs_sum, xs_sq = [], [], [], [], 0.0, 0.0
    kl_tok = {name: [] for name in saes}
    xsum = None
    for wb in tokens.split(batch_windows):
        keep = counted_positions(wb, bos, True)
        loss_mask, targets = keep[:, :-1], wb[:, 1:]
        cap = {}
        def capture(act, hook): cap[hook.name] = act
        logits = model.run_with_hooks(wb, fwd_hooks=[(hook, capture), (resid_name, capture)])
        act, resid = cap[hook], cap[resid_name]
        logp_clean = logits.float().log_softmax(-1)
        def ce_per_window(lg):
            ce = F.cross_entropy(lg[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none").view(targets.shape)
            return (ce * loss_mask).double().sum(1)
        def spliced(replacement):
            def fn(a, hook): return torch.where(keep[..., None], replacement.to(a.dtype), a)
            return model.run_with_hooks(resid, start_at_layer=0, fwd_hooks=[(hook, fn)])
        clean_ce.append(ce_per_window(logits)); zero_ce.append(ce_per_window(spliced(torch.zeros(()))))
        n_tok.append(keep.sum(1).double()); n_loss.append(loss_mask.sum(1).double())
        x = act[keep].double()
        xsum = x.sum(0) if xsum is None else xsum + x.sum(0)
        xs_sq += x.square().sum().item()
        for name, sae in saes.items():
            f = sae.encode(act.float())
            x_hat = sae.decode(f)
            se = ((act.double() - x_hat.double()).square().sum(-1) * keep).sum(1)
            l0 = ((f != 0).sum(-1).double() * keep).sum(1)
            lg = spliced(x_hat)
            kl = F.kl_div(lg.float().log_softmax(-1), logp_clean, log_target=True, reduction="none").sum(-1).double() * keep
            o = out[name]
            o["kl"].append(kl.sum(1)); o["ce"].append(ce_per_window(lg)); o["sse"].append(se); o["l0"].append(l0)
            kl_tok[name].append(kl[keep])
    cat = lambda xs: torch.cat(xs).numpy()
    n_tok, n_loss, clean_ce, zero_ce = cat(n_tok), cat(n_loss), cat(clean_ce), cat(zero_ce)
    N = n_tok.sum()
    total_var = xs_sq - float(xsum.square().sum()) / N
    res = {}
    for name, o in out.items():
        kl, ce, sse, l0 = (cat(o[k]) for k in ("kl", "ce", "sse", "l0"))
        c0, cc, cs = zero_ce.sum() / n_loss.sum(), clean_ce.sum() / n_loss.sum(), ce.sum() / n_loss.sum()
        res[name] = dict(l0=l0.sum() / N, ev=1 - sse.sum() / total_var, lr=(c0 - cs) / (c0 - cc), kl=kl.sum() / N,
                         ce=cs, kl_win=kl, ce_win=ce, kl_tok=torch.cat(kl_tok[name]).numpy())
    res["_"] = dict(n_tok=n_tok, n_loss=n_loss, clean=clean_ce.sum() / n_loss.sum(), zero=zero_ce.sum() / n_loss.sum(),
                    n_windows=len(n_tok))
    return res


def paired_se(res, a, b):
    "(KL_a - KL_b, SE over windows (ratio estimator), SE over tokens) of the mean-per-token KL difference."
    n = res["_"]["n_tok"]
    d = res[a]["kl_win"] - res[b]["kl_win"]
    diff = d.sum() / n.sum()
    resid = d - diff * n  # ratio-estimator linearisation
    W = len(n)
    se_w = math.sqrt(W / (W - 1) * (resid ** 2).sum()) / n.sum()
    dt = res[a]["kl_tok"] - res[b]["kl_tok"]
    se_t = dt.std(ddof=1) / math.sqrt(len(dt))
    return diff, se_w, se_t


def interp_at(l0, pts):
    "Linear interpolation in log L0 of (loss recovered, KL) between the two nearest of `pts` [(l0, lr, kl)]; None outside."
    pts = sorted(pts)
    for (a0, alr, akl), (b0, blr, bkl) in zip(pts, pts[1:]):
        if a0 <= l0 <= b0 and b0 > a0:
            t = (math.log(l0) - math.log(a0)) / (math.log(b0) - math.log(a0))
            return alr + t * (blr - alr), akl + t * (bkl - akl)
    return None


def table(rows, res, ref=None):
    print(f"| {'run':<34} | L0 | EV | loss rec. | KL | KL - {ref or 'ref'} (SE windows / tokens) | train wall s | CPU s | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, info in rows.items():
        r = res[name]
        d = ""
        if ref is not None and name != ref:
            diff, se_w, se_t = paired_se(res, name, ref)
            d = f"{diff:+.4f} ({se_w:.4f} / {se_t:.4f})"
        print(f"| {name:<34} | {r['l0']:.1f} | {r['ev']:.4f} | {r['lr']:.4f} | {r['kl']:.4f} | {d} | {info['wall']:.0f} | {info['cpu']:.0f} | {info['load']} |")


def matched_table(abl, res):
    "Standard ablation: each variant's loss recovered and KL interpolated in log L0 at every SAELens L0 and every L0 of our defaults."
    groups = {}
    for name in abl:
        variant = name.rsplit(" l1=", 1)[0].removeprefix("ablate ")
        groups.setdefault(variant, []).append((res[name]["l0"], res[name]["lr"], res[name]["kl"]))
    at = sorted(float(res[n]["l0"]) for n in abl if "saelens" in n or n.startswith("ablate ours none "))
    print("\n## Matched L0 (each variant interpolated in log L0 between its own two nearest points; '-' outside its range)\n")
    print("| variant | its L0 points | " + " | ".join(f"loss rec. / KL at L0 {x:.1f}" for x in at) + " |")
    print("|---|---|" + "---|" * len(at))
    for variant, pts in groups.items():
        cells = []
        for x in at:
            m = next(((lr_, kl) for l0, lr_, kl in pts if l0 == x), None) or interp_at(x, pts)
            cells.append("-" if m is None else f"{m[0]:.4f} / {m[1]:.4f}")
        print(f"| {variant} | {', '.join(f'{p[0]:.1f}' for p in sorted(pts))} | " + " | ".join(cells) + " |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["frontier", "ablate", "all"], default="all")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--width", type=int, default=4, help="d_sae = width * d_in")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ks", default="16,32,64")
    p.add_argument("--l1-ours", default="0.3,1.0", help="our l1_coefficient values (standard)")
    p.add_argument("--l1-saelens", default="1,3", help="SAELens l1_coefficient values (standard)")
    p.add_argument("--archs", default="topk,standard")
    p.add_argument("--ablate-k", type=int, default=32)
    p.add_argument("--architecture", choices=["topk", "standard"], default="topk", help="--part ablate: the architecture ablated")
    p.add_argument("--ablate-l1", default="0.5,1.5", help="--architecture standard: our l1_coefficient values (each ablation runs at each)")
    p.add_argument("--ablate-l1-saelens", default="1,3", help="--architecture standard: SAELens' l1_coefficient values")
    p.add_argument("--ablations", default="all", help="comma list of ablation names (see ABLATIONS; 'saelens' for SAELens' default), or all")
    p.add_argument("--seeds", default="0", help="training seeds for the ablation's defaults and SAELens rows")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--eval-threads", type=int, default=None, help="torch threads while scoring (default: as training)")
    p.add_argument("--check-eval", action="store_true", help="also score the first SAE with sae_nb.eval.evaluate")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: 20 steps of 256 tokens, width 1, 512 eval tokens")
    p.add_argument("--pkg", default=None, help="folder holding a copy of sae_nb to import first")
    a = p.parse_args()
    if a.quick: a.steps, a.batch_size, a.width, a.eval_tokens, a.ks, a.ablations = 20, 256, 1, 512, "32", "saelens,none,b_dec_none,no_sched"
    import sae_nb
    from sae_nb.models import load_model
    from sae_nb.data import load_corpus, tokenize_corpus
    print("command:", " ".join([os.path.basename(sys.executable)] + sys.argv))
    print("date:", time.strftime("%Y-%m-%d %H:%M"), "| sae_nb from", os.path.dirname(sae_nb.__file__))
    print("machine:", machine())
    import sae_lens
    print("sae_lens", getattr(sae_lens, "__version__", "?"))
    log(f"GEMM 4096x1536x6144 fp32: {gemm_rate():.0f} GFLOP/s")

    hook, ctx = "blocks.0.mlp.hook_post", 128
    model1 = load_model("smollm2-135m", n_layers=1)
    n_train_windows = math.ceil(a.steps * a.batch_size / (ctx - 1))
    n_eval_windows = max(1, a.eval_tokens // ctx)
    tokens = tokenize_corpus(load_corpus("pydoc"), model1, context_size=ctx,
                             max_tokens=(n_train_windows + n_eval_windows + 1) * ctx, show_progress=False)
    if tokens.shape[0] < n_train_windows + n_eval_windows: raise SystemExit(f"the corpus has {tokens.shape[0]} windows; need {n_train_windows + n_eval_windows}")
    train_tok, eval_tok = tokens[:n_train_windows], tokens[-n_eval_windows:]
    t = time.perf_counter()
    batches = collect(model1, train_tok, hook, a.batch_size, a.steps)
    d_in = batches[0].shape[1]
    d_sae = a.width * d_in
    del model1
    log(f"collected {a.steps} x {a.batch_size} rows (d_in {d_in}) in {time.perf_counter() - t:.0f} s; d_sae {d_sae}; "
        f"eval: {n_eval_windows} held-out windows of {ctx} ({n_eval_windows * (ctx - 1)} scored tokens)")
    print(f"budget: {a.steps} steps x {a.batch_size} tokens, width {a.width}x ({d_in} x {d_sae}), lr {a.lr}")

    saes, info = {}, {}
    def run(name, fn, *args, **kw):
        sae, wall, cpu, hist = fn(batches, *args, **kw)
        saes[name] = sae
        extra = ""
        if hist is not None: extra = f" train-L0 {hist['l0'][-1]:.1f} dead {hist['dead_fraction'][-1]:.3f}"
        info[name] = dict(wall=wall, cpu=cpu, load=load())
        log(f"trained {name}: {wall:.0f} s wall, {cpu:.0f} s CPU{extra}")

    seeds = [int(s) for s in a.seeds.split(",")]
    lr = a.lr
    if a.part in ("frontier", "all"):
        archs = a.archs.split(",")
        if "topk" in archs:
            for k in (int(x) for x in a.ks.split(",")):
                run(f"topk k={k} ours", train_ours, "topk", d_in, d_sae, lr, k=k)
                run(f"topk k={k} saelens", train_saelens, "topk", d_in, d_sae, lr, k=k)
        if "standard" in archs:
            for l1 in (float(x) for x in a.l1_ours.split(",")):
                run(f"standard l1={l1:g} ours", train_ours, "standard", d_in, d_sae, lr, l1=l1)
            for l1 in (float(x) for x in a.l1_saelens.split(",")):
                run(f"standard l1={l1:g} saelens", train_saelens, "standard", d_in, d_sae, lr, l1=l1)
    if a.part in ("ablate", "all"):
        k = a.ablate_k
        T = a.steps
        ABLATIONS = {
            "none": {},
            "b_dec_none": dict(b_dec_init=None),
            "b_dec_mean": dict(b_dec_init="mean"),
            "warmup_0": dict(lr_warmup_steps=0),
            f"warmup_5pct": dict(lr_warmup_steps=max(1, round(0.05 * T))),
            "decay_0": dict(lr_decay_steps=0),
            "no_sched": dict(lr_warmup_steps=0, lr_decay_steps=0),
            "clip_none": dict(grad_clip_norm=None),
            "enc_scale_0.1": dict(enc_scale=0.1),
            "auxk_window_short": dict(dead_feature_window=50 * a.batch_size),
            "auxk_window_short_coef1": dict(dead_feature_window=50 * a.batch_size, aux_loss_coefficient=1.0),
            "b_dec_none+no_sched": dict(b_dec_init=None, lr_warmup_steps=0, lr_decay_steps=0),
            "b_dec_mean+no_sched": dict(b_dec_init="mean", lr_warmup_steps=0, lr_decay_steps=0),
            "warmup_5pct+decay_0": dict(lr_warmup_steps=max(1, round(0.05 * T)), lr_decay_steps=0),
            "b_dec_none+warmup_5pct+decay_0": dict(b_dec_init=None, lr_warmup_steps=max(1, round(0.05 * T)), lr_decay_steps=0),
            "b_dec_mean+warmup_5pct": dict(b_dec_init="mean", lr_warmup_steps=max(1, round(0.05 * T))),
            "lr_x2": dict(lr=2 * lr),
            "lr_x2+warmup_5pct": dict(lr=2 * lr, lr_warmup_steps=max(1, round(0.05 * T))),
            "cli": dict(lr_warmup_steps=min(50, T // 10), b_dec_init="mean"),  # what `sae_nb train`/`sweep` pass
        }
        names = ["saelens", *ABLATIONS] if a.ablations == "all" else a.ablations.split(",")
        unknown = [nm for nm in names if nm != "saelens" and nm not in ABLATIONS]
        if unknown: raise SystemExit(f"unknown ablations {unknown}: choose from saelens, {', '.join(ABLATIONS)}")
        if a.architecture == "standard":
            names = [nm for nm in names if nm not in ("enc_scale_0.1", "auxk_window_short", "auxk_window_short_coef1")]  # topk only
            for s in seeds:
                tag = f" s{s}" if len(seeds) > 1 else ""
                if "saelens" in names:
                    for l1 in (float(x) for x in a.ablate_l1_saelens.split(",")):
                        run(f"ablate saelens l1={l1:g}{tag}", train_saelens, "standard", d_in, d_sae, lr, l1=l1, seed=s)
                for nm in names:
                    if nm == "saelens" or (s != seeds[0] and nm != "none"): continue
                    for l1 in (float(x) for x in a.ablate_l1.split(",")):
                        over = dict(ABLATIONS[nm]); lr_run = over.pop("lr", lr)
                        run(f"ablate ours {nm} l1={l1:g}{tag}", train_ours, "standard", d_in, d_sae, lr_run, l1=l1, seed=s, **over)
        for s in (seeds if a.architecture == "topk" else []):
            tag = f" s{s}" if len(seeds) > 1 else ""
            if "saelens" in names: run(f"ablate saelens k={k}{tag}", train_saelens, "topk", d_in, d_sae, lr, k=k, seed=s)
            for nm in names:
                if nm == "saelens": continue
                if s != seeds[0] and nm not in ("none",): continue
                over = dict(ABLATIONS[nm]); lr_run = over.pop("lr", lr)
                run(f"ablate ours {nm}{tag}", train_ours, "topk", d_in, d_sae, lr_run, k=k, seed=s, **over)
    del batches

    model = load_model("smollm2-135m")
    if a.eval_threads: torch.set_num_threads(a.eval_threads)
    t = time.perf_counter()
    res = score(model, saes, eval_tok, hook)
    u = res["_"]
    log(f"scored {len(saes)} SAEs on {int(u['n_tok'].sum())} tokens ({u['n_windows']} windows, {int(u['n_loss'].sum())} "
        f"loss positions) in {time.perf_counter() - t:.0f} s; CE clean {u['clean']:.4f}, zero-ablated {u['zero']:.4f}")
    if a.check_eval:
        from sae_nb.eval import evaluate
        name = next(n for n in saes if "ours" in n)
        e = evaluate(model, saes[name], eval_tok, hook)
        print(f"check vs sae_nb.eval.evaluate ({name}): L0 {e['l0']:.3f}/{res[name]['l0']:.3f} EV {e['explained_variance']:.5f}/"
              f"{res[name]['ev']:.5f} loss rec. {e['loss_recovered']:.5f}/{res[name]['lr']:.5f} KL {e['kl']:.5f}/{res[name]['kl']:.5f}")

    frontier = {n: i for n, i in info.items() if not n.startswith("ablate")}
    if frontier:
        print("\n## Frontier (ours vs SAELens, same data and budget)\n")
        print("| arch | setting | library | L0 | EV | loss rec. | KL | KL ours - SAELens (SE windows / tokens) | train wall s | CPU s | load |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for name, inf in frontier.items():
            arch, setting, lib = name.split(" ")
            r = res[name]
            d = ""
            other = name.replace(" ours", " saelens")
            if lib == "ours" and other in res:
                diff, se_w, se_t = paired_se(res, name, other)
                d = f"{diff:+.4f} ({se_w:.4f} / {se_t:.4f})"
            print(f"| {arch} | {setting} | {lib} | {r['l0']:.1f} | {r['ev']:.4f} | {r['lr']:.4f} | {r['kl']:.4f} | {d} | {inf['wall']:.0f} | {inf['cpu']:.0f} | {inf['load']} |")
        ours_std = [(res[n]["l0"], res[n]["lr"], res[n]["kl"]) for n in frontier if n.startswith("standard") and n.endswith("ours")]
        for n in frontier:
            if n.startswith("standard") and n.endswith("saelens"):
                r = res[n]
                m = interp_at(r["l0"], ours_std)
                if m is None: print(f"matched L0 {r['l0']:.1f} ({n}): outside our L0 range {sorted(round(x[0], 1) for x in ours_std)}")
                else: print(f"matched L0 {r['l0']:.1f} ({n}): ours (interpolated in log L0) loss rec. {m[0]:.4f} vs {r['lr']:.4f}, KL {m[1]:.4f} vs {r['kl']:.4f}")
    abl = {n: i for n, i in info.items() if n.startswith("ablate")}
    if abl:
        ref = next((n for n in abl if "saelens" in n), next(iter(abl)))
        what = f"topk k={a.ablate_k}" if a.architecture == "topk" else "standard (ReLU + L1)"
        print(f"\n## Ablation ({what}; KL differences paired against {ref!r})\n")
        table(abl, res, ref)
        if a.architecture == "standard": matched_table(abl, res)
    log(f"GEMM 4096x1536x6144 fp32 at the end: {gemm_rate():.0f} GFLOP/s")


if __name__ == "__main__":
    main()
