"""Time `sae_nb.eval.roundtrip` on the study's SAE shape (d_in 2048, d_sae 16384) against
(a) the bare GEMM `W_dec @ W_enc` it is built on (target: roundtrip <= 1.3x the GEMM) and
(b) the study's per-feature loop (`roundtrip_reference`), timed on a sample of features and extrapolated to all
    of them (target: roundtrip >= 25x faster).
All timings come from this one process; each is the best of --repeats runs. Prints ratios and the command.

    .venv/bin/python bench/bench_roundtrip.py [--d-in 2048 --d-sae 16384 --sample 256 --repeats 1 --device cpu]  (--repeats 2: steadier ratios, twice the time)
"""
import argparse, os, shlex, sys, time

import torch

from sae_nb.config import get_device, seed_everything
from sae_nb.eval import roundtrip, roundtrip_reference
from sae_nb.sae import SAE, SAEConfig


def _sync(device):
    if device.type == "cuda": torch.cuda.synchronize()


def timed(fn, device):
    "Seconds one call of fn takes (device synchronised), and its result."
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-in", type=int, default=2048)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--sample", type=int, default=256, help="features the study's loop runs (then extrapolated)")
    p.add_argument("--repeats", type=int, default=1, help="best-of-N for the GEMM and the batched roundtrip")
    p.add_argument("--chunk-size", type=int, default=None, help="roundtrip chunk size (default: its own)")
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    device = get_device(a.device)
    g = seed_everything(0)
    sae = SAE.from_config(SAEConfig(d_in=a.d_in, d_sae=a.d_sae, device=str(device)), generator=g).eval()
    with torch.no_grad():
        sae.b_enc.copy_(-0.05 * torch.rand(a.d_sae, generator=g).to(device))
        sae.b_dec.copy_(torch.randn(a.d_in, generator=g).to(device))
    print(f"SAE {a.d_in} x {a.d_sae} float32 on {device}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs")

    def gemm():
        with torch.inference_mode(): return sae.W_dec @ sae.W_enc
    with torch.inference_mode(): timed(lambda: sae.W_dec[:256] @ sae.W_enc, device)  # warm-up (BLAS / cuBLAS init)
    t_gemm, t_rt = [], []
    for _ in range(a.repeats):
        t, c = timed(gemm, device); t_gemm.append(t); del c
        t, res = timed(lambda: roundtrip(sae, chunk_size=a.chunk_size), device); t_rt.append(t)
    sample = torch.randperm(a.d_sae, generator=g)[: a.sample]
    t_loop, ref = timed(lambda: roundtrip_reference(sae, features=sample), device)
    ok = torch.allclose(res["max_ratio"][sample.to(device)], ref["max_ratio"], rtol=1e-4, atol=1e-5, equal_nan=True)
    t_loop_all = t_loop * a.d_sae / len(sample)
    gemm_s, rt_s = min(t_gemm), min(t_rt)
    print(f"bare GEMM W_dec @ W_enc      : {gemm_s:8.2f} s   (runs: {', '.join(f'{t:.2f}' for t in t_gemm)})")
    print(f"batched roundtrip (all)      : {rt_s:8.2f} s   (runs: {', '.join(f'{t:.2f}' for t in t_rt)})")
    print(f"study loop, {len(sample)} features     : {t_loop:8.2f} s  -> {t_loop_all:.1f} s extrapolated to {a.d_sae}")
    print(f"roundtrip / GEMM             : {rt_s / gemm_s:8.2f}x  (target <= 1.3x)")
    print(f"study loop / roundtrip       : {t_loop_all / rt_s:8.1f}x  (target >= 25x)")
    print(f"study loop / bare GEMM       : {t_loop_all / gemm_s:8.1f}x  (the ceiling for any exact batched roundtrip here)")
    print(f"sampled features agree with the loop: {ok}")
    print("command:", " ".join(shlex.quote(x) for x in [sys.executable, *sys.argv]))


if __name__ == "__main__":
    main()
