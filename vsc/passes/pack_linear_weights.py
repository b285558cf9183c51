"""pack-linear-weights{include_head}: linears run by oneDNN over weights packed once at load.

What it changes: each `linear` op's weight W (a checkpoint tensor or a fused concat) gets a
derived weight `onednn_pack(@W) {batch = max_batch}` (same type; oneDNN's blocked memory
layout, made once when the server loads), and the op moves to the `torch.linear_onednn`
kernel, which reads it:

    %qkv = linear(%xn, @...qkv_proj_packed.weight) via torch.linear_onednn

Why: F.linear on this CPU (MKL sgemm) repacks its weight operand on every call. For the
skinny inputs of decode ([16, 576] x [576, 3072]) that streams every weight twice per step
and leaves decode at a third of DRAM bandwidth; a weight packed once streams at close to
bandwidth. Measured (2 threads): SmolLM2-135M's 30 layers of linears at 16 rows 35.3 ->
14.2 ms; tiny-Llama shapes at 1 thread ~1.0-2x, prefill-sized inputs ~2x
(vsc/runtime/kernels/torch_ops.py: linear_onednn). Memory: the packed copy replaces the
original (a weight only feeding a derivation is dropped after load).

`include_head`: also pack linears outside the layer region (the LM head). A weight shared
with an embedding (tied) keeps its plain layout for the embedding, so packing it means a
second copy: only with `tied_head=true`, which charges that copy to the KV cache budget
(SmolLM2-135M: +113 MB; its head at 16 rows 17.9 -> 5.9 ms, at one row 9.6 -> 4.2 ms on
2 threads, bench/RESULTS.md). CPU targets; f32 or bf16 weights, each packed in its own dtype.
oneDNN accumulates in another order than MKL: may_change_outputs=True, the accuracy check
runs after it.

`dtype=bf16`: an f32 model's linear weights are packed rounded to bf16
(`onednn_pack(@W) {batch, dtype = bf16}`; the weight's type stays f32, what the linear
computes), and each linear rounds its input to bf16 and returns f32 (oneDNN accumulates in
f32, with AVX512-BF16 dot products). Everything else (norms, attention, the KV cache,
the residual stream) stays f32. Half the weight bytes; SmolLM2-135M shapes on this
2-core box, packed bf16 vs packed f32: 1.4-2.2x at 1-16 rows, ~2x at prompt sizes
(bench/RESULTS.md). Lossy: for a spec whose accuracy bar is a logits tolerance.
"""
from __future__ import annotations

from vsc.errors import VscError
from vsc.ir.module import KernelRef, ModelGraph, ServingModule, Weight, layer_op_ids, walk_ops
from vsc.ir.rewrite import credit_freed_weight_bytes, times_run, unique_weight_name, variant_weight_name
from vsc.ir.sizes import weight_bytes
from vsc.ir.types import pass_origin
from vsc.passes.base import Option, Pass, register_pass

KERNEL = "torch.linear_onednn"
#: The `dtype` option: keep each weight's own dtype, or store f32 weights as bf16.
PACK_DTYPES = ("same", "bf16")
#: Weight dtypes oneDNN packs here (f16 inner products have no fast path on AVX-512 without FP16).
PACKABLE = ("f32", "bf16")


@register_pass
class PackLinearWeights(Pass):
    name = "pack-linear-weights"
    summary = "linears by oneDNN over weights packed once at load (F.linear repacks them every call)"
    options = (Option("include_head", bool, True, "also pack linears outside the layer region (the LM head)"),
               Option("tied_head", bool, False, "also pack a head tied to the embedding, as a second copy charged "
                      "to the KV cache budget"),
               Option("dtype", str, "same", "what the packed weights hold: same (the loaded dtype, f32 or bf16), "
                      "bf16 (f32 weights rounded to bf16, activations rounded at each linear, f32 accumulation: "
                      "half the bytes, AVX512-BF16 dot products; lossy)", choices=PACK_DTYPES))
    may_change_outputs = True

    def apply(self, module: ServingModule) -> None:
        if module.target.kind != "cpu":
            raise VscError(f"pack-linear-weights packs for oneDNN on the CPU; this plan targets {module.target.kind}")
        model, func = module.model, module.model.func
        origin = pass_origin(self.name)
        batch = max(1, int(module.batching.max_batch or 1))
        plain_readers = {op.operands[1] for op in walk_ops(func.body) if op.kind != "linear" and len(op.operands) > 1}
        layer_ops = layer_op_ids(func)
        packed: dict[str, str] = {}
        before = weight_bytes(model)
        times = times_run(module)
        for op in walk_ops(func.body):
            if op.kind != "linear":
                continue
            weight = op.operands[1]
            in_layer = id(op) in layer_ops
            if (not in_layer and not self.include_head) or (weight in plain_readers and (in_layer or not self.tied_head)):
                continue
            source = model.weight(weight)
            if source is None or source.type.dtype not in PACKABLE or source.type.rank != 2:
                continue
            if weight not in packed:
                packed[weight] = self._declare(model, source, batch, self.dtype, origin)
                self.stat("packed", times[id(op)], "weights")
            op.operands = [op.operands[0], packed[weight], *op.operands[2:]]
            op.kernel = KernelRef(KERNEL)
            op.origin = origin
            self.stat("moved", times[id(op)], f"linears to {KERNEL}")
        if not packed:
            dtypes = sorted({w.type.dtype for op in walk_ops(func.body) if op.kind == "linear"
                             for w in [model.weight(op.operands[1])] if w is not None})
            stored = f"the linear weights are {', '.join(dtypes)}" if dtypes else "the plan has no linear op"
            raise VscError(f"found no f32 or bf16 linear weight to pack ({stored}): take pack-linear-weights out "
                           f"of the pipeline (or --disable-pass pack-linear-weights), or load the model with "
                           f"`dtype = f32` or `dtype = bf16`")
        credit_freed_weight_bytes(module, before, origin)     # a tied head's copy is charged to the cache

    @staticmethod
    def _declare(model: ModelGraph, source: Weight, batch: int, dtype: str, origin) -> str:
        """`onednn_pack(@source) {batch[, dtype = bf16]}`: the weight keeps its type (what the
        linear computes with); a `dtype` attr says the packed copy stores it rounded to bf16."""
        name = unique_weight_name(model, variant_weight_name(source.name, "packed"))
        at = model.weights.index(source) + 1
        attrs: dict = {"batch": batch}
        if dtype != "same" and dtype != source.type.dtype:
            attrs["dtype"] = dtype
        model.weights.insert(at, Weight(name, source.type, "onednn_pack", [source.name], attrs, origin))
        return name
