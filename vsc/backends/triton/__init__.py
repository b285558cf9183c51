"""The Triton backend: the kernels behind the IR's `triton.*` catalog entries, and their
ahead-of-time compilation for a CUDA target.

- `vsc.runtime.kernels.triton_ops` — `@triton.jit` kernels with autotune spaces and thin
  launch wrappers (`rmsnorm`, `rope`, `silu_mul`, `paged_decode_attention`,
  `paged_attention`, `write_kv_cache`, `matmul`). CPU tensors run through Triton's
  interpreter, so the same code is testable on a machine without a GPU.
- `vsc.backends.triton.aot` — `compile_kernels(out_dir, target)`: PTX + cubin for fixed
  signatures, plus a `kernels.json` index (what `vsc compile` writes to `server/kernels/`).

Both import `triton`; this package itself does not, so importing `vsc.backends` never
needs it. See docs/triton-kernels.md for each kernel's roofline on the reference shape.
"""
