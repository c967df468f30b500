"""One prepared GPU check for sae_nb (issue 14, item 5): run it once on a CUDA machine, paste its table into bench/README.md.

    bench/gpu_check            (a wrapper running this file with .venv/bin/python, from anywhere; about 2-4 minutes on one H100-class GPU; exits 2 at once without CUDA)
    bench/gpu_check --quick    (small shapes: a smoke run whose figures mean nothing)

What it does, in order, each part printing as it goes and ending in one markdown table:
  1. equality: the sparse TopK path and AuxK (dead features) on CUDA against the CPU, float64, small SAE: loss, x_hat and
     every gradient (topk, batchtopk, matryoshka_batchtopk, and the standard step);
  2. determinism: whether a TopK/standard step runs under `torch.use_deterministic_algorithms(True)` (index_add_ and
     embedding_bag's backward have no deterministic CUDA kernel in some torch versions) and whether two steps from the
     same state give bit-identical weights without it;
  3. speed at 2048 x 16384, batch 4096, float32 (TF32 off, then on) and a bfloat16 SAE: one SAE step (training_loss ->
     backward -> hooks -> Adam) vs its bare GEMMs (standard: the six GEMMs; topk: the encoder GEMM + topk), tokens/s;
  4. a short `train_sae` on CUDA (standard and topk, 50 steps): tokens/s of the whole loop;
  5. the activation store on the embedded SmolLM2-135M (blocks.0.mlp.hook_post) tokens/s, and the roundtrip vs its GEMM.
Timings: CUDA-synchronised, median of --repeats after a warm-up. No figure is asserted; equality failures are printed as FAIL
and make the exit status 1.
"""
import argparse, os, statistics, sys, time, warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")
import torch

ROWS, FAILED = [], []


def row(part, figure, value, note=""):
    ROWS.append((part, figure, value, note)); print(f"  {part} | {figure} | {value} | {note}", flush=True)


def cuda_time(fn, repeats=5):
    "Median CUDA-synchronised seconds of fn() after one warm-up call."
    fn(); torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter(); fn(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def part_equality():
    from sae_nb.sae import SAE, SAEConfig
    print("\n1. sparse TopK path and AuxK: CUDA vs CPU, float64", flush=True)
    for arch in ("standard", "topk", "batchtopk", "matryoshka_batchtopk"):
        for dead in (False, True):
            if arch == "standard" and dead: continue
            kw = dict(k=4) if "topk" in arch else {}
            cfg = SAEConfig(arch, d_in=32, d_sae=256, dtype="float64", **kw)
            g = torch.Generator().manual_seed(0)
            cpu = SAE.from_config(cfg, generator=g)
            with torch.no_grad():
                for p in cpu.parameters(): p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
            gpu = SAE.from_config(cfg, generator=torch.Generator().manual_seed(0)).cuda()
            gpu.load_state_dict(cpu.state_dict())
            x = torch.randn(64, 32, generator=g, dtype=torch.float64)
            mask = (torch.arange(256) % 3 == 0) if dead else None
            res = []
            for s, dev in ((cpu, "cpu"), (gpu, "cuda")):
                if hasattr(s, "sparse_training"): s.sparse_training = True
                s.train(); s.zero_grad()
                out = s.training_loss(x.to(dev), 0.1, dead_mask=None if mask is None else mask.to(dev))
                out["loss"].backward()
                res.append([out["loss"].detach().cpu(), out["x_hat"].detach().cpu(), out["aux"].detach().cpu()] + [p.grad.cpu() for p in s.parameters()])
            err = max(float((a - b).abs().max()) for a, b in zip(*res))
            ok = err < 1e-9
            if not ok: FAILED.append(f"{arch} dead={dead}")
            row("1 equality", f"{arch}{' + AuxK (1/3 dead)' if dead else ''}: max |CUDA - CPU| over loss, x_hat, aux, grads", f"{err:.1e}", "PASS" if ok else "FAIL")


def part_determinism():
    from sae_nb.sae import SAE, SAEConfig
    print("\n2. determinism", flush=True)
    for arch in ("standard", "topk"):
        cfg = SAEConfig(arch, d_in=256, d_sae=4096, device="cuda", **(dict(k=32) if arch == "topk" else {}))
        x = torch.randn(1024, 256, device="cuda")
        def step(s):
            s.zero_grad(); s.training_loss(x, 1e-3)["loss"].backward(); return [p.grad.clone() for p in s.parameters()]
        s = SAE.from_config(cfg, generator=torch.Generator().manual_seed(0))
        same = all(torch.equal(a, b) for a, b in zip(step(s), step(s)))
        try:
            torch.use_deterministic_algorithms(True); step(s); det = "runs"
        except RuntimeError as e: det = f"refused: {str(e).splitlines()[0][:90]}"
        finally: torch.use_deterministic_algorithms(False)
        row("2 determinism", f"{arch}: two backward passes bit-identical (default)", str(same))
        row("2 determinism", f"{arch}: under torch.use_deterministic_algorithms(True)", det)


def part_speed(d_in, d_sae, B, repeats):
    from sae_nb.sae import SAE, SAEConfig
    print(f"\n3. one step vs its GEMMs, {d_in} x {d_sae}, batch {B}", flush=True)
    for label, dtype, tf32 in (("float32", torch.float32, False), ("float32 + TF32", torch.float32, True), ("bfloat16 SAE", torch.bfloat16, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        x = torch.randn(B, d_in, device="cuda", dtype=dtype).relu()
        W_enc, W_dec = torch.randn(d_in, d_sae, device="cuda", dtype=dtype), torch.randn(d_sae, d_in, device="cuda", dtype=dtype)
        f, gf, gx = torch.randn(B, d_sae, device="cuda", dtype=dtype), torch.randn(B, d_sae, device="cuda", dtype=dtype), torch.randn(B, d_in, device="cuda", dtype=dtype)
        six = cuda_time(lambda: (x @ W_enc, f @ W_dec, gx @ W_dec.T, f.T @ gx, x.T @ gf, gf @ W_enc.T), repeats)
        enc_topk = cuda_time(lambda: torch.topk(x @ W_enc, 32, dim=-1, sorted=False), repeats)
        del f, gf
        for arch, floor, fname in (("standard", six, "six GEMMs"), ("topk", enc_topk, "encoder GEMM + topk")):
            s = SAE.from_config(SAEConfig(arch, d_in=d_in, d_sae=d_sae, device="cuda", dtype=str(dtype).split(".")[1],
                                          **(dict(k=32) if arch == "topk" else {})))
            opt = torch.optim.Adam(s.parameters(), lr=1e-4, fused=True)
            def step():
                out = s.training_loss(x, 1e-3); out["loss"].backward(); s.on_before_optimizer_step(); opt.step()
                s.on_after_optimizer_step(); opt.zero_grad(set_to_none=True)
            t = cuda_time(step, repeats)
            row("3 speed", f"{arch} {label}: step {t * 1e3:.1f} ms, {B / t:,.0f} tok/s", f"{t / floor:.2f}x {fname}", f"floor {floor * 1e3:.1f} ms")
            del s, opt
        torch.backends.cuda.matmul.allow_tf32 = False


def part_train(d_in, d_sae, B, steps):
    from sae_nb.sae import SAEConfig
    from sae_nb.train import TrainConfig, train_sae
    print(f"\n4. train_sae on CUDA, {steps} steps", flush=True)
    X = torch.randn(B * 8, d_in, device="cuda").relu()
    for arch in ("standard", "topk"):
        cfg = SAEConfig(arch, d_in=d_in, d_sae=d_sae, **(dict(k=32) if arch == "topk" else {}))
        torch.cuda.synchronize(); t = time.perf_counter()
        sae, h = train_sae(X, cfg, TrainConfig(batch_size=B, steps=steps, device="cuda", show_progress=False, log_every=25))
        torch.cuda.synchronize(); t = time.perf_counter() - t
        row("4 train_sae", f"{arch} {d_in} x {d_sae}, batch {B}, {steps} steps (set-up included)", f"{steps * B / t:,.0f} tok/s",
            f"final loss {h['loss'][-1]:.4g}, L0 {h['l0'][-1]:.1f}")


def part_store_roundtrip(quick):
    from sae_nb.models import load_model
    from sae_nb.data import load_corpus, tokenize_corpus
    from sae_nb.activations import ActivationStore
    from sae_nb.sae import SAE, SAEConfig
    from sae_nb.eval import roundtrip
    print("\n5. activation store (SmolLM2-135M) and roundtrip", flush=True)
    try:
        model = load_model("smollm2-135m", device="cuda")
        tokens = tokenize_corpus(load_corpus("pydoc"), model, context_size=128, max_tokens=40_000 if quick else 400_000)
        store = ActivationStore(model, tokens, "blocks.0.mlp.hook_post", batch_size=4096, model_batch_size=64)
        n = 5 if quick else 40
        it = iter(store)
        next(it)  # the first buffer fill
        torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(n): next(it)
        torch.cuda.synchronize(); t = time.perf_counter() - t
        row("5 store", "ActivationStore, blocks.0.mlp.hook_post, batch 4096", f"{n * 4096 / t:,.0f} tok/s")
    except Exception as e:  # the embedded model or corpus missing on that machine: say so, go on
        row("5 store", "ActivationStore on SmolLM2-135M", "not run", f"{type(e).__name__}: {str(e)[:80]}")
    d_in, d_sae = (256, 2048) if quick else (2048, 16384)
    s = SAE.from_config(SAEConfig("standard", d_in=d_in, d_sae=d_sae, device="cuda")).eval()
    with torch.inference_mode():
        g = cuda_time(lambda: s.W_dec @ s.W_enc, 3); r = cuda_time(lambda: roundtrip(s), 3)
    row("5 roundtrip", f"roundtrip {d_in} x {d_sae}: {r * 1e3:.1f} ms", f"{r / g:.2f}x its GEMM", "target <= 1.3")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    if not torch.cuda.is_available():
        print(f"bench/gpu_check: no CUDA device here (torch {torch.__version__}, torch.cuda.is_available() is False); "
              "nothing was measured. Run it on a machine with an NVIDIA GPU and a CUDA build of torch.", file=sys.stderr)
        sys.exit(2)
    d_in, d_sae, B = (256, 2048, 1024) if a.quick else (2048, 16384, 4096)
    print(f"sae_nb gpu_check {time.strftime('%Y-%m-%d %H:%M')}: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}", flush=True)
    t0 = time.perf_counter()
    part_equality(); part_determinism(); part_speed(d_in, d_sae, B, a.repeats); part_train(d_in, d_sae, B, 10 if a.quick else 50)
    part_store_roundtrip(a.quick)
    print(f"\n| part | figure | value | note |\n|---|---|---|---|")
    for r in ROWS: print("| " + " | ".join(r) + " |")
    print(f"\n{time.perf_counter() - t0:.0f} s in all; equality: {'FAIL ' + ', '.join(FAILED) if FAILED else 'PASS'}")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
