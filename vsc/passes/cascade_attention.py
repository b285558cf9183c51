"""cascade-attention{min_tokens}: decode attention reads a shared prefix once per step, not once per sequence.

What it changes: every `attention` op gets `cascade_min_tokens = N`. The generated runner
then passes N to `attention_metadata`, which, each step, finds the largest group of
decoding sequences whose block tables start with the same physical blocks (what the
prefix cache gives requests that share a system prompt) and, when they share at least N
tokens, lays the step out as a cascade (vsc.runtime.kernels.torch_ops.CascadePrefix):
the group's queries attend to the shared prefix together — one [members x heads-per-kv,
prefix] GEMM per kv head, reading the prefix's K/V once — and each sequence attends to
the rest of its own context; the two parts merge by their softmax max and sum
(FlashInfer's cascade / "shared-prefix" attention, on the CPU).

When it pays: many concurrent decodes behind one long shared prefix. Without it, decode
attention copies every sequence's whole context out of the paged cache per layer per step
(16 sequences x 768 shared tokens: the same K/V read 16 times), and the attention is 16
GEMVs; with it the shared part is one GEMM. Measured (one thread, 16 sequences, a 768-token
shared prefix plus 80-185 own tokens): 3.4 -> 0.4 ms per layer at tiny-Llama's shape, 11.2 ->
1.0 ms per layer at SmolLM2-135M's (9 heads, 3 kv heads x 64). It costs a host-side pass
over the step's block tables (a few microseconds) and nothing when no group shares N tokens.

With select-kernels' tvm.paged_attention the same layout runs as TVM kernels read in place
(vsc.backends.tvm.cascade_attention: the members in the vector lanes, each prefix K/V row loaded
once for 16 sequences x the GQA group, merged with the decode kernel's own part by log-sum-exp):
SmolLM2's shape, 2 threads, 16 sequences behind a 768-token prefix: 522 -> 290 us per layer
against the TVM decode kernel alone; 2840 -> 1081 us behind 4096 tokens (bench/RESULTS.md).

Exact up to float rounding (a different summation order), so may_change_outputs=True and the
accuracy check runs after it — through the engine, with prefix-sharing requests. Requires
prefix-cache (without it no two sequences hold the same blocks), a float KV cache and a CPU
target (torch's or TVM's attention kernel).
"""
from __future__ import annotations

from vsc.errors import VscError
from vsc.ir.module import ServingModule, walk_ops
from vsc.ir.types import pass_origin
from vsc.passes.base import Option, Pass, register_pass


@register_pass
class CascadeAttention(Pass):
    name = "cascade-attention"
    summary = "decode attention over a prefix shared through the prefix cache: one GEMM per step, not one read per sequence"
    options = (Option("min_tokens", int, 64, "shortest shared prefix worth a cascade (tokens)", minimum=1),)
    requires = ("prefix-cache",)
    may_change_outputs = True

    def apply(self, module: ServingModule) -> None:
        cache = module.cache
        if cache.prefix_sharing == "none":
            raise VscError("cascade attention needs the prefix cache (run prefix-cache first)")
        if cache.dtype == "i8":
            raise VscError("cascade attention reads a float KV cache; this plan's is int8 (kv-int8)")
        if module.target.kind != "cpu":
            raise VscError(f"cascade attention is implemented by the CPU kernels (torch, TVM); this plan targets "
                           f"{module.target.kind}")
        origin = pass_origin(self.name)
        for op in walk_ops(module.model.func.body):
            if op.kind == "attention":
                op.attrs["cascade_min_tokens"] = self.min_tokens
                op.origin = origin
