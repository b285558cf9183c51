"""kv-int8{granularity, tokens}: store the paged KV cache as int8 with per-token-head scales.

What it changes: the `cache` section's dtype becomes `i8`; its capacity is recomputed from
the budget at the int8 size per token (int8 values plus one fp32 scale per token and kv
head, see `vsc.ir.sizes.kv_bytes_per_token`), rounded down to whole blocks; attention ops
move to a kernel that quantizes K/V as it writes them into the cache and dequantizes the
blocks it reads back (`torch.paged_attention_int8`). Nothing else in the graph moves.

When it pays: when the KV cache, not compute, caps how many sequences run at once (long
contexts, many concurrent requests, a small memory budget). The same budget then holds
about 4x the tokens of an fp32 cache (2x of bf16/f16): 4 * head_dim / (head_dim + 4), e.g.
3.76x at head_dim 64, 3.56x at 32. It costs a quantize per written token and a dequantize
of every context read, so a plan whose batch is bounded by something else (max_batch,
the step budget, latency goals) gains nothing and pays that work. It is lossy: the
PassManager runs the numeric check after it, and the default fp32 bar (1e-3 logits) is too
tight for int8; give the spec a looser one, e.g. `accuracy { logits_tol(0.05, probes = 4) }`.
Measured max |logit error| against the fp32 reference (8 probes x 16 tokens, greedy tokens
all exact): 9.7e-3 on the tiny llama, 0.76 on SmolLM2-135M (logits_tol(2.0) there).

Quantization: symmetric, scale = amax(|x|) / 127 over one head's head_dim vector of one
token (`granularity = token-head`, the only choice). A paged cache is written one token at
a time and a slot is never rewritten, so a scale must be computable from that token alone:
per-block or per-channel scales would change as later tokens arrive and force
re-quantizing (and re-reading) what is already stored; one scale per token across all kv
heads would let one head's outlier crush another head's resolution for no saving worth
having (the scale is 4 bytes against head_dim bytes of values).

Why paged only (`requires = paged-kv`): the point is more tokens in the same bytes, and only
a paged cache turns spare capacity into more concurrent sequences; a contiguous cache has
a fixed max_batch x max_context slab, so int8 would only shrink it. Run kv-int8 after
paged-kv, and after `paged-kv{tokens=N}` give `kv-int8{tokens=N}` to keep N (by default it
fills the budget).

Targets: the Triton paged-attention kernel reads float caches only, so on cuda attention
runs on the torch int8 kernel (the other Triton kernels are untouched), and
`select-kernels` keeps it there (kernel choice is by cache dtype too).
"""
from __future__ import annotations

from vsc.errors import VscError
from vsc.ir.kernels import KERNELS, best_kernel
from vsc.ir.module import KernelRef, ServingModule, walk_ops
from vsc.ir.rewrite import paged_kv_capacity
from vsc.ir.types import pass_origin
from vsc.passes.base import Option, Pass, register_pass

INT8 = "i8"


@register_pass
class KVInt8(Pass):
    name = "kv-int8"
    summary = "store the paged KV cache as int8 with an fp32 scale per token and kv head (~4x the fp32 tokens)"
    options = (
        Option("granularity", str, "token-head", "what one scale covers: one token's head_dim vector of one kv head",
               choices=("token-head",)),
        Option("tokens", int, 0, "cache capacity in tokens (0: as many as the memory budget holds at int8)", minimum=0),
    )
    requires = ("paged-kv",)
    may_change_outputs = True  # int8 rounding of K and V moves the logits

    def apply(self, module: ServingModule) -> None:
        cache = module.cache
        if cache.layout != "paged":
            raise VscError(f"kv-int8 needs a paged KV cache, the plan's is {cache.layout} (run paged-kv first)")
        target = module.target.kind
        kernel = best_kernel("attention", target, "paged", INT8)
        if kernel is None:
            raise VscError(f"kv-int8: no attention kernel reads an int8 paged KV cache on target {target}")
        capacity = paged_kv_capacity(module, INT8, cache.block_size, self.tokens, kind="int8")
        cache.dtype, cache.capacity_tokens = INT8, capacity
        cache.origin = pass_origin(self.name)
        self.stat("sized", capacity, "int8 cache tokens")
        for op in walk_ops(module.model.func.body):
            info = KERNELS.get(op.kernel.name) if op.kernel is not None else None
            if op.kind == "attention" and (info is None or INT8 not in info.cache_dtypes):
                op.kernel = KernelRef(kernel)
                op.origin = pass_origin(self.name)
                self.stat("moved", 1, f"attentions to {kernel}")
