"""A/B: TVM GGUF quantized-linear kernels vs torch fp32 F.linear vs dequantize + F.linear.

SmolLM2-135M linear shapes, M = 1 and 16, hot (one weight, cache resident) and cold (a ring
of distinct weights larger than the 32 MiB L3), 1 and 2 threads. Prints µs per call and
effective GB/s over the weight bytes (the format's GGUF size; fp32 bytes for F.linear).

    .venv/bin/python bench/tvm_quant_linear_ab.py [--quick]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from vsc.backends.tvm.build import build_quant_kernels
from vsc.runtime import quant
from vsc.runtime.kernels import tvm_ops

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]
FMTS = ["q8_0", "q4_0", "q4_1"]
COLD_BYTES = 96 << 20


def timeit(fn, ring: int, budget: float) -> float:
    for i in range(min(ring, 8) + 2):
        fn(i % ring)
    n, i, t0 = 0, 0, time.perf_counter()
    while True:
        for _ in range(ring if ring > 1 else 16):
            fn(i % ring)
            i += 1
            n += 1
        dt = time.perf_counter() - t0
        if dt > budget:
            return dt / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="shorter timing budget")
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    budget = 0.05 if args.quick else 0.25
    t0 = time.time()
    lib = tvm_ops.load_tvm_kernels(build_quant_kernels([(f, n, k) for f in FMTS for n, k in SHAPES]))
    print(f"# kernels ready in {time.time() - t0:.1f}s")
    print(f"{'thr':>3} {'N':>6} {'K':>5} {'M':>3} {'cache':>5} {'impl':<22} {'us':>9} {'GB/s':>7}")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        tvm_ops.set_num_threads(threads)
        for n, k in SHAPES:
            g = torch.Generator().manual_seed(0)
            w0 = torch.randn(n, k, generator=g) * 0.05
            for cold in (False, True):
                rows = []
                for fmt in FMTS:
                    nbytes = quant.nbytes((n, k), fmt)
                    ring = max(1, -(-COLD_BYTES // nbytes)) if cold else 1
                    base = quant.quantize(w0, fmt)
                    weights = [base] + [{p: t.clone() for p, t in base.items()} for _ in range(ring - 1)]
                    fn_h = lib.quant_linear_fn(fmt, n, k)
                    for m in (1, 16):
                        x = torch.randn(m, k)
                        out = torch.empty(m, n)
                        dt = timeit(lambda i: tvm_ops.quant_linear(lib, x, weights[i], fmt, out=out, fn=fn_h),
                                    ring, budget)
                        rows.append((m, f"tvm {fmt}", dt, nbytes))
                        scratch = torch.empty(n, k)
                        dt = timeit(lambda i: F.linear(x, tvm_ops.dequantize(lib, weights[i], fmt, out=scratch)),
                                    ring, budget)
                        rows.append((m, f"tvm-dequant+linear {fmt}", dt, nbytes))
                    weights = None  # free before the next format
                fbytes = n * k * 4
                ring = max(1, -(-COLD_BYTES // fbytes)) if cold else 1
                ws = [w0] + [w0.clone() for _ in range(ring - 1)]
                for m in (1, 16):
                    x = torch.randn(m, k)
                    dt = timeit(lambda i: F.linear(x, ws[i]), ring, budget)
                    rows.append((m, "torch fp32 linear", dt, fbytes))
                ws = None
                for m, impl, dt, nb in sorted(rows, key=lambda r: r[0]):
                    print(f"{threads:>3} {n:>6} {k:>5} {m:>3} {'cold' if cold else 'hot':>5} {impl:<22} "
                          f"{dt * 1e6:>9.1f} {nb / dt / 1e9:>7.1f}", flush=True)
    # Python -> TVM call overhead: the smallest kernel, M = 1, one thread
    tvm_ops.set_num_threads(1)
    n, k = 192, 576
    parts = quant.quantize(torch.randn(n, k), "q8_0")
    x, out = torch.randn(1, k), torch.empty(1, n)
    fn_h = lib.quant_linear_fn("q8_0", n, k)
    args3 = (parts["qs"], parts["d"], parts["d"])
    d_direct = timeit(lambda i: fn_h(x, *args3, out), 1, 0.3)
    d_wrap = timeit(lambda i: tvm_ops.quant_linear(lib, x, parts, "q8_0", out=out, fn=fn_h), 1, 0.3)
    d_alloc = timeit(lambda i: tvm_ops.quant_linear(lib, x, parts, "q8_0"), 1, 0.3)
    print(f"# q8_0 192x576 M=1, 1 thread: direct handle {d_direct * 1e6:.2f} us, wrapper(out, fn) "
          f"{d_wrap * 1e6:.2f} us, wrapper(lookup + alloc) {d_alloc * 1e6:.2f} us")


if __name__ == "__main__":
    main()
