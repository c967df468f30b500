"""Benchmark of `sae_nb.activations.ActivationStore` on the embedded default model.

Run from the repository root:  .venv/bin/python bench/bench_activations.py   (about 2-3 minutes on 2 CPU cores)

(a) memory: peak RSS (`resource.getrusage`, each run in a fresh subprocess) collecting every activation of N and
    of 10N tokens through the store; the buffer bounds memory, so the ratio should be within 10% of 1.
(b) speed, in input tokens per second on the same token windows:
    - the store vs the study's way (full model, `run_with_cache` of every hook, logits included): target >= 10x;
    - the store vs the model's own forward up to the hook's block (`model(tokens, stop_at_layer=block + 1)`)
      and vs a bare forward that stops at the hook itself (the least work possible): target < 15% more time;
    - the store's own work (buffer writes, shuffle, batch copies) as a fraction of the time its model forwards
      take, both timed inside the same store runs, so other load on the machine cancels out.
All ratios are measured in this one run. Timings are the best of `--repeats` alternating runs, in wall-clock and in
CPU time of this process, with 1 torch thread by default (`--threads`): on a shared machine CPU time is the steadier
measure of work. Each timed store is built afresh (buffer allocation and the 4-token probe forward included).
"""
import argparse, json, os, resource, shlex, subprocess, sys, time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def peak_rss_mb() -> float:
    "Peak resident set size of this process in MB (ru_maxrss is KB on Linux, bytes on macOS)."
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1 << 20) if sys.platform == "darwin" else r / 1024


def reset_peak_rss() -> bool:
    "Reset this process's peak RSS (Linux: /proc/self/clear_refs, which getrusage follows); False where unsupported."
    try:
        with open("/proc/self/clear_refs", "w") as f: f.write("5")
        return True
    except OSError: return False


def current_rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f: return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
    except OSError: return None


def load(args, n_layers):
    from sae_nb.data import load_corpus, tokenize_corpus
    from sae_nb.models import load_model
    model = load_model(args.model, n_layers=n_layers, device="cpu")
    return model, lambda n: tokenize_corpus(load_corpus(), model, context_size=args.context, max_tokens=n,
                                            show_progress=False)


def rss_child(args):
    "Collect every activation of `args.rss_child` tokens through the store; print peak RSS as JSON."
    import torch
    from sae_nb.activations import ActivationStore
    model, tokenize = load(args, check_hook_name_layers(args))
    tokens = tokenize(args.rss_child)
    store = ActivationStore(model, tokens, args.hook, batch_size=args.batch_size, buffer_size=args.buffer_size,
                            model_batch_size=args.model_batch_size, loop=False, show_progress=False)
    import gc; gc.collect()
    load_peak = peak_rss_mb()
    reset = reset_peak_rss()  # the model's load-time transients are not the store's
    before = current_rss_mb()
    rows, total = 0, torch.zeros(store.d_in, dtype=torch.float64)
    for batch in store:
        rows += len(batch); total += batch.sum(0)  # touch every row, keep nothing
    print(json.dumps({"tokens": tokens.numel(), "rows": rows, "d_in": store.d_in, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": before,
                      "load_peak_mb": load_peak, "peak_reset": reset}))


def check_hook_name_layers(args) -> int:
    "Blocks needed for the hook: `blocks.K.*` needs K + 1."
    import re
    m = re.match(r"blocks\.(\d+)\.", args.hook)
    return int(m.group(1)) + 1 if m else None


def timed(f) -> tuple[float, float]:
    "(wall-clock seconds, CPU seconds of this process) that f() takes."
    w, c = time.perf_counter(), time.process_time()
    f()
    return time.perf_counter() - w, time.process_time() - c


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--hook", default="blocks.0.mlp.hook_post")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--n-tokens", type=int, default=8192, help="N for the memory test (>= 2 buffers, so both runs reach the steady state)")
    p.add_argument("--speed-tokens", type=int, default=16384, help="tokens for the store/forward timings")
    p.add_argument("--naive-tokens", type=int, default=512, help="tokens for the full-model run_with_cache timing")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--buffer-size", type=int, default=4096)
    p.add_argument("--model-batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads for (b); 1 keeps CPU-time ratios clean")
    p.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child is not None: return rss_child(args)

    print("command:", shlex.join([sys.executable] + sys.argv))
    t_start = time.perf_counter()
    if hasattr(os, "getloadavg"): print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    import torch
    from sae_nb.activations import ActivationStore, _StopForward
    from sae_nb.models import check_hook_name
    model, tokenize = load(args, check_hook_name_layers(args))  # also fills the model's on-disk cache before (a)
    # (a) memory, fresh subprocess per size
    child = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--hook", args.hook,
             "--context", str(args.context), "--batch-size", str(args.batch_size), "--buffer-size",
             str(args.buffer_size), "--model-batch-size", str(args.model_batch_size)]
    res = {}
    for n in (args.n_tokens, 10 * args.n_tokens):
        out = subprocess.run(child + ["--rss-child", str(n)], capture_output=True, text=True)
        if out.returncode != 0: sys.exit(f"memory run for {n} tokens failed:\n{out.stderr[-3000:]}")
        res[n] = json.loads(out.stdout.strip().splitlines()[-1])
    a, b = res[args.n_tokens], res[10 * args.n_tokens]
    what = "since the end of loading (peak reset via /proc/self/clear_refs)" if a["peak_reset"] else "of the whole process"
    print(f"\n(a) peak RSS (getrusage, fresh process per run, {what}) collecting every activation of {args.hook}"
          f"\n    through the store (buffer {args.buffer_size} rows, batch {args.batch_size}, model batch {args.model_batch_size} windows)")
    for r in (a, b):
        grow = "" if r["rss_before_mb"] is None else f"; RSS before collecting {r['rss_before_mb']:.0f} MB"
        print(f"    {r['tokens']:>8} tokens -> {r['rows']:>8} rows: peak RSS {r['peak_rss_mb']:.0f} MB"
              f"  (peak while loading model + tokens {r['load_peak_mb']:.0f} MB{grow})")
    ratio = b["peak_rss_mb"] / a["peak_rss_mb"]
    whole = max(b["peak_rss_mb"], b["load_peak_mb"]) / max(a["peak_rss_mb"], a["load_peak_mb"])
    print(f"    whole-process peak ratio 10N / N (model loading included) = {whole:.3f}")
    print(f"    (holding every float32 activation of 10N tokens, as the study did, would take "
          f"{b['rows'] * b['d_in'] * 4 / 2**20:.0f} MB on top)")
    print(f"    peak RSS ratio 10N / N = {ratio:.3f}  (target within 10% of 1: {'PASS' if abs(ratio - 1) <= 0.10 else 'FAIL'})")

    # (b) speed
    torch.set_num_threads(args.threads)
    tokens = tokenize(args.speed_tokens)
    n_tok = tokens.numel()
    block = check_hook_name(model, args.hook)
    mbs = args.model_batch_size
    in_model = []  # (wall, cpu) seconds spent inside the store's model forwards, per store run

    def run_store():
        s = ActivationStore(model, tokens, args.hook, batch_size=args.batch_size, buffer_size=args.buffer_size,
                            model_batch_size=mbs, loop=False, show_progress=False)
        read, spent = s._source.read, [0.0, 0.0]
        def timed_read(w):  # time inside the model's forward (up to the hook), to split off the store's own work
            w0, c0 = time.perf_counter(), time.process_time()
            out = read(w)
            spent[0] += time.perf_counter() - w0; spent[1] += time.process_time() - c0
            return out
        s._source.read = timed_read
        for batch in s: pass
        in_model.append(tuple(spent))

    def run_forward():
        with torch.no_grad():
            for i in range(0, len(tokens), mbs): model(tokens[i:i + mbs], stop_at_layer=block + 1)

    def stop(act, hook): raise _StopForward
    def run_forward_to_hook():
        with torch.no_grad(), model.hooks(fwd_hooks=[(args.hook, stop)]):
            for i in range(0, len(tokens), mbs):
                try: model(tokens[i:i + mbs], stop_at_layer=block + 1)
                except _StopForward: pass

    run_store(); run_forward(); run_forward_to_hook()  # warm up
    in_model.clear()
    times = {"store": [], "forward": [], "to_hook": []}
    for _ in range(args.repeats):  # alternating, best of each: the machine may be shared
        times["store"].append(timed(run_store))
        times["forward"].append(timed(run_forward))
        times["to_hook"].append(timed(run_forward_to_hook))
    best = {k: (min(w for w, _ in v), min(c for _, c in v)) for k, v in times.items()}
    own = [min(t[i] / m[i] - 1 for t, m in zip(times["store"], in_model)) for i in (0, 1)]

    full, _ = load(args, None)
    naive_tokens = tokens[: max(1, args.naive_tokens // args.context)]
    def run_naive():  # the study's collection: full model, every hook cached, logits, torch.concat per batch
        acts = None
        with torch.no_grad():
            for i in range(0, len(naive_tokens), 4):
                _, cache = full.run_with_cache(naive_tokens[i:i + 4])
                a = cache[args.hook].reshape(-1, cache[args.hook].shape[-1])
                acts = a if acts is None else torch.concat([acts, a])
    t_naive = timed(run_naive)
    n_naive = naive_tokens.numel()
    print(f"\n(b) input tokens per second (wall clock; CPU time of this process in brackets), {args.model} {args.hook},"
          f"\n    context {args.context}, model batch {mbs} windows, {torch.get_num_threads()} torch thread(s), best of {args.repeats}")
    line = lambda name, n, t: print(f"    {name:<52} {n / t[0]:8.0f} tok/s  ({n / t[1]:8.0f} tok/s CPU)")
    line(f"store (n_layers={block + 1} model, shuffle, {n_tok} tokens)", n_tok, best["store"])
    line(f"model(tokens, stop_at_layer={block + 1}) ({n_tok} tokens)", n_tok, best["forward"])
    line(f"bare forward stopped at the hook ({n_tok} tokens)", n_tok, best["to_hook"])
    line(f"naive full-model run_with_cache ({n_naive} tokens)", n_naive, t_naive)
    verdict = lambda ok: "PASS" if ok else "FAIL"
    speed = [(n_tok / best["store"][i]) / (n_naive / t_naive[i]) for i in (0, 1)]
    over_fwd = [best["store"][i] / best["forward"][i] - 1 for i in (0, 1)]
    over_hook = [best["store"][i] / best["to_hook"][i] - 1 for i in (0, 1)]
    print(f"    store vs naive run_with_cache: {speed[0]:.1f}x faster ({speed[1]:.1f}x in CPU time)"
          f"  target >= 10x: {verdict(min(speed) >= 10)}")
    print(f"    store time vs model(tokens, stop_at_layer={block + 1}): {over_fwd[0]:+.1%} ({over_fwd[1]:+.1%} CPU)"
          f"  target < +15%: {verdict(max(over_fwd) < 0.15)}")
    print(f"    store time vs bare forward stopped at the hook: {over_hook[0]:+.1%} ({over_hook[1]:+.1%} CPU)"
          f"  target < +15%: {verdict(over_hook[1] < 0.15)} (CPU)")
    print(f"    store's own work (buffer, shuffle, copies) vs its model forwards, same runs: {own[0]:+.1%} ({own[1]:+.1%} CPU)")
    if hasattr(os, "getloadavg"): print(f"    load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
                                        "(with other processes running, wall-clock timings are noisy; CPU time less so)")
    print(f"\ntotal bench time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
