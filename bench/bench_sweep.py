"""Benchmark: N SAEs from one activation stream (`train_saes`, what `sae_nb sweep` runs) vs N separate runs
(`train_sae` on a fresh `ActivationStore` each, what N `sae_nb train` runs do in their collect + train stage).

Run from the repository root (about 2-3 minutes on 2 shared CPU cores; nothing is asserted, this prints):

    .venv/bin/python bench/bench_sweep.py                          # 4 topk SAEs (k 8,16,32,64) on smollm2-135m
    .venv/bin/python bench/bench_sweep.py --steps 4 --batch-size 128   # smoke run, figures meaningless

Both sides use the embedded model's blocks.0.mlp.hook_post, the same token windows (tokenised once, not timed),
steps, batch size, seed and TrainConfig as the CLI builds it; the model is loaded once. Evaluation is left out: it
costs the same per SAE on both sides (`sae_nb sweep` evaluates every SAE like `train` does). The separate runs are
timed first, then the sweep. Printed:

  * per separate run: wall, collect (the store's own model time, `store.collect_seconds`) and train (the rest)
    seconds, and the collection share collect / wall;
  * the sweep's wall, collect and train seconds;
  * ratio = sweep wall / sum of the separate walls, against the target (one collection + the N SAEs' own
    training) / (N collections + N trainings) = 1 - share * (1 - 1/N), computed from the separate runs' figures.
"""
import argparse, os, sys, time, warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--hook", default="blocks.0.mlp.hook_post")
    p.add_argument("--k", default="8,16,32,64", help="the topk SAEs' k values (N = how many)")
    p.add_argument("--expansion", type=int, default=1)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--context-size", type=int, default=128)
    a = p.parse_args()
    import torch
    from sae_nb.activations import ActivationStore
    from sae_nb.data import load_corpus, tokenize_corpus
    from sae_nb.models import load_model
    from sae_nb.sae import SAEConfig
    from sae_nb.train import TrainConfig, train_sae, train_saes
    ks = [int(k) for k in a.k.split(",")]
    n = len(ks)
    model = load_model(a.model, device="cpu")
    n_tok = a.steps * a.batch_size
    tokens = tokenize_corpus(load_corpus("pydoc"), model, context_size=a.context_size,
                             max_tokens=n_tok * a.context_size // (a.context_size - 1) + a.context_size, show_progress=False)
    store = lambda: ActivationStore(model, tokens, a.hook, batch_size=a.batch_size, seed=0, device="cpu", show_progress=False)
    d_in = store().d_in
    cfgs = [SAEConfig(architecture="topk", d_in=d_in, d_sae=a.expansion * d_in, k=k) for k in ks]
    tc = TrainConfig(batch_size=a.batch_size, steps=a.steps, lr=1e-3, lr_warmup_steps=min(50, a.steps // 10), seed=0,
                     log_every=max(1, min(25, a.steps // 20)), b_dec_init="mean", show_progress=False, device="cpu")
    print(f"{n} topk SAEs (k {a.k}) from one stream vs {n} separate runs: {a.model} {a.hook} (d_in {d_in}), d_sae {a.expansion * d_in}, "
          f"{a.steps} steps x {a.batch_size} tokens; torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}")
    separate = []
    for k, cfg in zip(ks, cfgs):
        s = store(); t0 = time.perf_counter()
        train_sae(s, cfg, tc)
        wall = time.perf_counter() - t0; c = float(s.collect_seconds)
        separate.append((wall, c))
        print(f"  train_sae k={k:<4} wall {wall:7.1f} s   collect {c:6.1f} s   train {wall - c:6.1f} s   collection share {c / wall:.2f}")
    s = store(); t0 = time.perf_counter()
    train_saes(s, cfgs, tc)
    sweep_wall = time.perf_counter() - t0; sc = float(s.collect_seconds)
    print(f"  train_saes ({n})  wall {sweep_wall:7.1f} s   collect {sc:6.1f} s   train {sweep_wall - sc:6.1f} s")
    sep_wall, sep_c = sum(w for w, _ in separate), sum(c for _, c in separate)
    share = sep_c / sep_wall
    target = 1 - share * (1 - 1 / n)
    print(f"\ncollection share of the separate runs: {share:.2f}")
    print(f"sweep / separate wall: {sweep_wall:.1f} / {sep_wall:.1f} s = {sweep_wall / sep_wall:.2f} "
          f"(target {target:.2f} = 1 - {share:.2f} x (1 - 1/{n}): one collection + the {n} SAEs' training)")
    print(f"collection: {sc:.1f} s once vs {sep_c:.1f} s in all = {sc / sep_c:.2f} (ideal 1/{n} = {1 / n:.2f}); "
          f"training: {sweep_wall - sc:.1f} s vs {sep_wall - sep_c:.1f} s = {(sweep_wall - sc) / (sep_wall - sep_c):.2f} (ideal 1.00); "
          f"load at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
