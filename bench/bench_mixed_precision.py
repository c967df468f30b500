"""float32 vs bfloat16 autocast training (`TrainConfig(autocast_dtype="bfloat16")`): speed and quality, in one process.

    .venv/bin/python bench/bench_mixed_precision.py [--steps 150 --width 1 --batch 1024 --eval-tokens 2048]

SmolLM2-135M (embedded), `blocks.0.mlp.hook_post` (d_in 1536), the embedded `pydoc` corpus; one fixed set of activations
(collected once) on which a standard SAE (width x d_in features) is trained twice from the same seed and batches, in
float32 and with bf16 autocast (float32 master weights); both are scored with `sae_nb.eval.evaluate` on the same
held-out windows (explained variance, loss recovered, L0). Training wall and CPU seconds are printed beside them. No
figure is asserted.
"""
import argparse, os, sys, time, warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")
import torch


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--width", type=int, default=1)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--arch", default="standard")
    a = p.parse_args()
    from sae_nb.models import load_model
    from sae_nb.data import load_corpus, tokenize_corpus
    from sae_nb.activations import ActivationStore
    from sae_nb.sae import SAEConfig
    from sae_nb.train import TrainConfig, train_sae
    from sae_nb.eval import evaluate
    hook = "blocks.0.mlp.hook_post"
    model = load_model("smollm2-135m", device="cpu")
    n_train = a.steps * a.batch
    tokens = tokenize_corpus(load_corpus("pydoc"), model, context_size=128, max_tokens=n_train * 128 // 127 + 128 + a.eval_tokens + 256)
    n_eval = max(a.eval_tokens // 128, 1)
    train_tok, eval_tok = tokens[:-n_eval], tokens[-n_eval:]
    t = time.perf_counter()
    store = ActivationStore(model, train_tok, hook, batch_size=a.batch, loop=False, shuffle=True, seed=0)
    X = torch.cat([b for _, b in zip(range(a.steps), store)])
    print(f"collected {X.shape[0]} activations in {time.perf_counter() - t:.0f} s; load {os.getloadavg()[0]:.1f}", flush=True)
    d_in = X.shape[1]
    rows = []
    for ac in (None, "bfloat16"):
        cfg = SAEConfig(a.arch, d_in=d_in, d_sae=a.width * d_in, k=32 if "topk" in a.arch else None, model_name="smollm2-135m", hook_name=hook)
        w, c = time.perf_counter(), time.process_time()
        sae, h = train_sae(X, cfg, TrainConfig(batch_size=a.batch, steps=a.steps, show_progress=False, log_every=a.steps, autocast_dtype=ac, device="cpu"))
        w, c = time.perf_counter() - w, time.process_time() - c
        m = evaluate(model, sae, eval_tok, hook)
        pick = {k: m[k] for k in ("explained_variance", "loss_recovered", "l0") if k in m}
        rows.append((ac or "float32", w, c, pick, os.getloadavg()[0]))
        print(f"{ac or 'float32':>9}: train {w:.1f} s wall, {c:.1f} s CPU; " + ", ".join(f"{k} {float(v):.4f}" for k, v in pick.items()) + f"; load {rows[-1][-1]:.1f}", flush=True)
    print(f"bf16 / float32 training time: {rows[1][1] / rows[0][1]:.3f} wall, {rows[1][2] / rows[0][2]:.3f} CPU")
    print("command:", " ".join([sys.executable] + sys.argv))


if __name__ == "__main__":
    main()
