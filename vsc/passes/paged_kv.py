"""paged-kv{block}: store the KV cache in fixed-size blocks instead of per-slot slabs.

Pays whenever sequence lengths vary: a contiguous cache reserves max_context tokens per
batch slot, a paged one only the blocks a sequence has filled, so the same memory holds
more concurrent sequences, and blocks can be shared between sequences (prefix caching).
The capacity grows to what the budget holds (or `tokens`, if given), rounded down to
whole blocks; attention ops move to a kernel that reads through a block table.
"""
from __future__ import annotations

from vsc.ir.kernels import KERNELS, PAGED_ATTENTION_KERNEL
from vsc.ir.module import KernelRef, ServingModule, walk_ops
from vsc.ir.rewrite import paged_kv_capacity
from vsc.ir.types import pass_origin
from vsc.passes.base import Option, Pass, register_pass


@register_pass
class PagedKV(Pass):
    name = "paged-kv"
    summary = "page the KV cache into fixed-size blocks; attention reads through a block table"
    options = (
        Option("block", int, 16, "tokens per KV block", minimum=1),
        Option("tokens", int, 0, "cache capacity in tokens (0: as many as the memory budget holds)", minimum=0),
    )

    def apply(self, module: ServingModule) -> None:
        cache = module.cache
        capacity = paged_kv_capacity(module, cache.dtype, self.block, self.tokens)
        cache.layout, cache.block_size, cache.capacity_tokens = "paged", self.block, capacity
        cache.origin = pass_origin(self.name)
        for op in walk_ops(module.model.func.body):
            if op.kind == "attention" and op.kernel is not None and "paged" not in KERNELS[op.kernel.name].cache_layouts:
                op.kernel = KernelRef(PAGED_ATTENTION_KERNEL)
                op.origin = pass_origin(self.name)
