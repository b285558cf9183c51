"""native-attention: decode attention by a C++ kernel that reads K/V in place through the block table.

What it changes: every `attention` op gets `native = true`. Lowering then builds
vsc/backends/native/paged_attention.cpp (once per source version, cached on disk; see
vsc.backends.native.build), the server folder ships the .so in kernels/, and the runner
hands it to decode attention (`AttentionMetadata.native`). Prefill and the cascade layout
(cascade-attention, when a group shares a prefix) keep their torch paths.

Why: on the CPU the torch decode kernel copies every sequence's context out of the paged
cache per layer per step (index_select of blocks), then runs SDPA over the copy; with long
contexts that copy is most of a decode step (code edits: 16 sequences of 1-2k tokens, the
gathers ~60% of decode time, bench/profile_engine.py). The native kernel reads each K and V
row once, in place, for all the query heads that share it, in fp32.

Exact up to float rounding (another summation order): may_change_outputs=True, the accuracy
check runs after it. Needs a cpu target, fp32 model and cache, a paged cache, and a C++
compiler where `vsc compile` runs (not where the server runs).
"""
from __future__ import annotations

from vsc.errors import VscError
from vsc.ir.module import ServingModule, walk_ops
from vsc.ir.types import pass_origin
from vsc.passes.base import Pass, register_pass


@register_pass
class NativeAttention(Pass):
    name = "native-attention"
    summary = "decode attention in a C++ kernel reading the paged KV cache in place (built by vsc compile)"
    requires = ("paged-kv",)
    may_change_outputs = True

    def apply(self, module: ServingModule) -> None:
        if module.target.kind != "cpu":
            raise VscError(f"native-attention is a CPU kernel; this plan targets {module.target.kind}")
        if module.cache.dtype != "f32" or module.model.attrs.get("dtype", "f32") != "f32":
            raise VscError(f"native-attention reads an fp32 cache of an fp32 model; this plan has a "
                           f"{module.cache.dtype} cache and {module.model.attrs.get('dtype')} weights")
        if module.cache.layout != "paged":
            raise VscError("native-attention reads a paged cache (run paged-kv first)")
        origin = pass_origin(self.name)
        for op in walk_ops(module.model.func.body):
            if op.kind == "attention":
                op.attrs["native"] = True
                op.origin = origin
