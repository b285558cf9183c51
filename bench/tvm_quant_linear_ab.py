"""A/B: TVM GGUF quantized-linear kernels, exact fp32 path vs int8-activation VNNI path, vs torch
fp32 F.linear.

SmolLM2-135M linear shapes (fused qkv 960x576, o 576x576, fused gate_up 3072x576, down 576x1536,
q8_0 LM head 49152x576), M = 1 and 16, hot (one weight, cache resident) and cold (a ring of
distinct weights larger than the 32 MiB L3), 1 and 2 threads. Every variant of one shape runs
side by side in one process, best of several rounds. Prints µs per call (wall) and, for one
thread, CPU µs of the calling thread (robust to other jobs time-slicing the cores), and GB/s
over the weight bytes (GGUF size; fp32 bytes for F.linear); then the per-token sum for
SmolLM2 at M = 1 (30 layers x 4 linears + head).

    .venv/bin/python bench/tvm_quant_linear_ab.py [--quick] [--fmts q4_0,q8_0] [--threads 1,2]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from vsc.backends.tvm.build import build_quant_kernels, host_target
from vsc.runtime import quant
from vsc.runtime.kernels import tvm_ops

LAYER = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
HEAD = (49152, 576)
LAYERS = 30
COLD_BYTES = 96 << 20


def timeit(fn, ring: int, budget: float, rounds: int) -> tuple[float, float]:
    """(best wall s, best calling-thread CPU s) per call over `rounds` rounds of ~budget s."""
    for i in range(min(ring, 8) + 2):
        fn(i % ring)
    best_w = best_c = float("inf")
    i = 0
    for _ in range(rounds):
        n, t0, c0 = 0, time.perf_counter(), time.thread_time()
        while True:
            for _ in range(ring if ring > 1 else 8):
                fn(i % ring)
                i += 1
                n += 1
            dt = time.perf_counter() - t0
            if dt > budget / rounds:
                break
        best_w = min(best_w, dt / n)
        best_c = min(best_c, (time.thread_time() - c0) / n)
    return best_w, best_c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="shorter timing budget")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--fmts", default="q4_0,q8_0", help="formats of the layer weights (the head is q8_0)")
    ap.add_argument("--no-cold", action="store_true")
    args = ap.parse_args()
    budget = 0.1 if args.quick else 0.4
    rounds = 5
    fmts = args.fmts.split(",")
    cases = [(f, n, k) for f in fmts for n, k in LAYER] + [("q8_0", *HEAD)]
    t0 = time.time()
    lib = tvm_ops.load_tvm_kernels(build_quant_kernels(sorted(set(cases)), host_target()))
    print(f"# kernels ready in {time.time() - t0:.1f}s (target {host_target()}); "
          f"VNNI on host: {tvm_ops.host_has_vnni()}")
    print(f"{'thr':>3} {'fmt':>5} {'N':>6} {'K':>5} {'M':>3} {'cache':>5} {'impl':<10} {'wall us':>9} "
          f"{'cpu us':>9} {'GB/s':>7}")
    token: dict[tuple, float] = {}
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        tvm_ops.set_num_threads(threads)
        for fmt, n, k in cases:
            g = torch.Generator().manual_seed(0)
            w0 = torch.randn(n, k, generator=g) * 0.05
            for cold in ((False,) if args.no_cold else (False, True)):
                nbytes = quant.nbytes((n, k), fmt)
                ring = max(1, -(-COLD_BYTES // nbytes)) if cold else 1
                base = quant.quantize(w0, fmt)
                weights = [base] + [{p: t.clone() for p, t in base.items()} for _ in range(ring - 1)]
                fn_x = lib.quant_linear_fn(fmt, n, k)
                fn_v = lib.vnni_fn(fmt, n, k)
                fbytes = n * k * 4
                fring = max(1, -(-COLD_BYTES // fbytes)) if cold else 1
                ws = [w0] + [w0.clone() for _ in range(fring - 1)] if fbytes * fring < (1 << 31) else None
                for m in (1, 16):
                    x = torch.randn(m, k)
                    out = torch.empty(m, n)
                    rows = []
                    dt = timeit(lambda i: tvm_ops.quant_linear(lib, x, weights[i], fmt, out=out, fn=fn_x),
                                ring, budget, rounds)
                    rows.append(("tvm fp32", dt, nbytes))
                    if fn_v is not None:
                        dt = timeit(lambda i: tvm_ops.quant_linear(lib, x, weights[i], fmt, out=out, fn=fn_v, vnni=True),
                                    ring, budget, rounds)
                        rows.append(("tvm vnni", dt, nbytes))
                    if ws is not None:
                        dt = timeit(lambda i: F.linear(x, ws[i % len(ws)]), fring if cold else 1, budget, rounds)
                        rows.append(("torch f32", dt, fbytes))
                    for impl, (dw, dc), nb in rows:
                        cpu = f"{dc * 1e6:>9.1f}" if threads == 1 else f"{'-':>9}"
                        print(f"{threads:>3} {fmt:>5} {n:>6} {k:>5} {m:>3} {'cold' if cold else 'hot':>5} {impl:<10} "
                              f"{dw * 1e6:>9.1f} {cpu} {nb / dw / 1e9:>7.1f}", flush=True)
                        if m == 1:
                            token[(threads, cold, fmt, n, k, impl)] = dc if threads == 1 else dw
                weights = ws = None
    for threads in [int(t) for t in args.threads.split(",")]:
        for cold in ((False,) if args.no_cold else (False, True)):
            for fmt in fmts:
                for impl in ("tvm fp32", "tvm vnni", "torch f32"):
                    keys = [(threads, cold, fmt, n, k, impl) for n, k in LAYER]
                    head = (threads, cold, "q8_0", *HEAD, impl)
                    if all(key in token for key in keys) and head in token:
                        tot = LAYERS * sum(token[key] for key in keys) + token[head]
                        what = "cpu" if threads == 1 else "wall"
                        print(f"# per token, M=1, {threads} thr, {'cold' if cold else 'hot'}, layers {fmt} + head q8_0, "
                              f"{impl}: {tot * 1e3:.2f} ms ({what})")


if __name__ == "__main__":
    main()
