"""Benchmark of `sae_nb.features.build_feature_index` (the feature index of 11_features).

Run from the repository root:  .venv/bin/python bench/bench_features.py   (about 3-5 minutes on 2 CPU cores)

(a) speed, in input tokens per second on the same token windows, all in this one process:
    - bare:     the model's forward truncated at the hook (`stop_at_layer`) + the encoder GEMM `x @ W_enc`
    - encode:   the same forward + `sae.encode` (the GEMM, bias, TopK: what any use of the features costs)
    - index:    `build_feature_index` (forward, encode, and every per-feature statistic, heap, reservoir,
                co-occurrence, then the decoder views, roundtrip and labels at the end)
    target: index / bare <= 1.5 (wall) for the streamed pass; the fixed end cost (logit effects through the
    unembedding for every feature, decoder neighbours, roundtrip: d_sae x d_vocab and d_sae^2 GEMMs, independent of
    the token count) is printed apart, with the token count whose bare cost it equals. Timings are the best of `--repeats` alternating runs, wall and CPU seconds.
(b) memory: peak RSS of `build_feature_index` at N and 4N tokens, each in a fresh subprocess (`--rss-child`); the
    accumulators never grow with the tokens, so the two peaks should be equal (the token tensor itself, 8 bytes a
    token, is the only thing that grows).
Also printed: the machine's float32 GEMM rate (the encoder GEMM's shape) and the load average, to read the figures by.
The SAE is a seeded random TopK SAE of the given shape on smollm2-135m blocks.0.mlp.hook_post (its weights do not
change the work: TopK fixes the number of nonzeros per token).
"""
import argparse, json, os, resource, subprocess, sys, time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


from bench_activations import current_rss_mb, peak_rss_mb, reset_peak_rss  # one copy of the RSS helpers (bench/ is on sys.path)


def setup(args):
    import torch
    from sae_nb.data import load_corpus, tokenize_corpus
    from sae_nb.models import load_model
    from sae_nb.sae import SAE, SAEConfig
    torch.set_num_threads(args.threads)
    model = load_model(args.model, n_layers=1, device="cpu")
    torch.manual_seed(0)
    sae = SAE.from_config(SAEConfig(architecture="topk", k=args.k, d_in=model.cfg.d_mlp, d_sae=args.d_sae, hook_name=args.hook)).eval()
    tokenize = lambda n: tokenize_corpus(load_corpus("pydoc"), model, context_size=args.context, max_tokens=n, show_progress=False)
    return model, sae, tokenize


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def rss_child(args):
    import torch
    from sae_nb.features import build_feature_index
    model, sae, tokenize = setup(args)
    tokens = tokenize(args.rss_child)
    import gc; gc.collect()
    before = peak_rss_mb()  # loading the model (smollm2's GGUF is dequantised) peaks far above what follows: reset the peak
    reset = reset_peak_rss()
    start = current_rss_mb()
    build_feature_index(model, sae, tokens, batch_size=args.batch_size, show_progress=False, cooccurrence=args.cooccurrence)
    print(json.dumps(dict(tokens=int(tokens.numel()), load_peak_mb=before, start_mb=start, peak_mb=peak_rss_mb(), reset=reset)))


def gemm_rate(n, d_in, d_sae, repeats=3):
    import torch
    a, b = torch.randn(n, d_in), torch.randn(d_in, d_sae)
    a @ b
    best = min(timed(lambda: a @ b)[0] for _ in range(repeats))
    return 2 * n * d_in * d_sae / best / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--hook", default="blocks.0.mlp.hook_post")
    p.add_argument("--d-sae", type=int, default=12288)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass (both paths)")
    p.add_argument("--speed-tokens", type=int, default=16384)
    p.add_argument("--rss-tokens", type=int, default=8192, help="N: peak RSS at N and 4N tokens")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--cooccurrence", default="auto", help="auto | exact | sampled")
    args = p.parse_args()
    if args.rss_child: return rss_child(args)
    if not args.skip_speed: speed(args)
    if not args.skip_rss: memory(args)


def speed(args):
    import torch
    from sae_nb.features import build_feature_index, _hook_acts
    from sae_nb.eval import _stop_layer
    model, sae, tokenize = setup(args)
    tokens = tokenize(args.speed_tokens)
    n = tokens.numel()
    print(f"model {args.model} {args.hook}, TopK SAE d_in {sae.cfg.d_in} d_sae {args.d_sae} k {args.k}; {n} tokens "
          f"({tokens.shape[0]} windows of {tokens.shape[1]}), batch {args.batch_size} windows, {torch.get_num_threads()} threads")
    print(f"load average {os.getloadavg()[0]:.2f}; float32 GEMM [{args.batch_size * args.context} x {sae.cfg.d_in} x {args.d_sae}]: "
          f"{gemm_rate(args.batch_size * args.context, sae.cfg.d_in, args.d_sae):.1f} GFLOP/s")
    stop = _stop_layer(model, args.hook)
    W = sae.W_enc.detach()

    @torch.inference_mode()
    def bare(encode=False):
        for b in tokens.split(args.batch_size):
            x = _hook_acts(model, b, args.hook, stop)
            f = sae.encode(x) if encode else x @ W
    split = {}
    def index():
        ix = build_feature_index(model, sae, tokens, batch_size=args.batch_size, show_progress=False, cooccurrence=args.cooccurrence)
        s = ix.meta["settings"]
        split["pass"] = min(split.get("pass", float("inf")), s["pass_seconds"])
        split["finish"] = min(split.get("finish", float("inf")), s["finish_seconds"])
        split["pass_cpu"] = min(split.get("pass_cpu", float("inf")), s["pass_cpu_seconds"])
        split["finish_cpu"] = min(split.get("finish_cpu", float("inf")), s["finish_cpu_seconds"])
        split["mode"] = s["cooccurrence"]
    runs = {"bare": lambda: bare(False), "encode": lambda: bare(True), "index": index}
    best = {k: (float("inf"), float("inf")) for k in runs}
    for r in range(args.repeats):
        for k, fn in runs.items():
            w, c = timed(fn)
            best[k] = (min(best[k][0], w), min(best[k][1], c))
            print(f"  run {r}: {k:6s} {w:7.2f} s wall {c:7.2f} s CPU ({n / w:8.0f} tok/s)  load {os.getloadavg()[0]:.2f}")
    for k in runs: print(f"{k:6s}: best {best[k][0]:.2f} s wall | {best[k][1]:.2f} s CPU: {n / best[k][0]:.0f} tok/s")
    rw, rc = best["index"][0] / best["bare"][0], best["index"][1] / best["bare"][1]
    rp, rpc = split["pass"] / best["bare"][0], split["pass_cpu"] / best["bare"][1]
    print(f"index streamed pass / bare (forward + encoder GEMM): {rp:.3f} wall | {rpc:.3f} CPU  "
          f"(target <= 1.5: {'PASS' if min(rp, rpc) <= 1.5 else 'MISS'}); co-occurrence {split['mode']}")
    print(f"index fixed end cost (logit effects d_sae x d_vocab, neighbours, roundtrip, labels): {split['finish']:.1f} s wall | "
          f"{split['finish_cpu']:.1f} s CPU = the bare CPU cost of {split['finish_cpu'] / best['bare'][1] * n:.0f} tokens")
    print(f"index whole build / bare on {n} tokens: {rw:.3f} wall | {rc:.3f} CPU")
    print(f"index / encode (forward + sae.encode): {best['index'][0] / best['encode'][0]:.3f} wall | {best['index'][1] / best['encode'][1]:.3f} CPU")


def memory(args):
    print(f"peak RSS, fresh subprocesses: TopK SAE d_sae {args.d_sae} k {args.k}, load average {os.getloadavg()[0]:.2f}")
    peaks = []
    for m in (1, 4):
        out = subprocess.run([sys.executable, __file__, "--rss-child", str(args.rss_tokens * m), "--d-sae", str(args.d_sae),
                              "--k", str(args.k), "--context", str(args.context), "--batch-size", str(args.batch_size),
                              "--model", args.model, "--hook", args.hook, "--threads", str(args.threads),
                              "--cooccurrence", args.cooccurrence],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        peaks.append(r["peak_mb"])
        print(f"peak RSS building the index on {r['tokens']} tokens: {r['peak_mb']:.0f} MB (RSS before the build {r['start_mb']:.0f} MB; "
              f"loading peaked at {r['load_peak_mb']:.0f} MB{'' if r['reset'] else ', peak NOT reset: the figure is the loading peak'})")
    print(f"peak ratio 4N / N: {peaks[1] / peaks[0]:.3f} (target 1.0)")


if __name__ == "__main__":
    main()
