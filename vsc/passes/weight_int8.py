"""weight-int8{group, include_head}: per-group symmetric int8 weights for `linear` ops.

What it changes. Each linear's weight W [out, in] (a checkpoint tensor or a fused concat)
becomes two derived weights, built at load time, and the op moves to `linear_int8`:

    weight @...q_proj_i8.weight : i8[out, in] = quantize_int8(@...q_proj.weight) {group = 64}
    weight @...q_proj_i8.scales : f32[out, in / 64] = int8_scales(@...q_proj.weight) {group = 64}
    %q = linear_int8(%xn, @...q_proj_i8.weight, @...q_proj_i8.scales) {group = 64} via torch.linear_int8

scale = amax|W| / 127 over each group of `group` consecutive input columns of a row (0:
the whole row), values = round(W / scale). The runner keeps only the int8 values and the
scales (the fp32 source is dropped after load), so weight memory shrinks ~4x for fp32
plans, and the bytes freed are added to the KV cache budget (run it before paged-kv /
continuous-batching to let them size the cache from it). Biases stay as they are. The LM
head (a linear outside the layer region) and any weight shared with an embedding stay
float unless `include_head=true`: the head's rounding lands straight on the logits, and a
head tied to the embedding table keeps its float copy for `embed` (the int8 one adds bytes).

Lossy (may_change_outputs): the PassManager runs the accuracy check after it with the spec's
bar, so a plan needs a tolerance that admits int8 rounding, e.g.
`accuracy { logits_tol(0.5, probes = 4) }`; the fp32 default (1e-3) refuses it, naming
the probe that moved.

When it pays: memory first; on the CPU also batch-1 decode, where a step streams every
weight from DRAM. Measured on this machine (AVX-512 EPYC, 32 MiB L3, one thread, fp32
activations), a SmolLM2-sized linear, us per call, best of 4 x 5 rounds; hot = the same
weight every call (in cache), cold = cycling 48 distinct weights (> L3), as a real step
reads each layer's weights once:

    us per call (hot / cold)        [1536x576] T=1    T=16         [576x1536] T=1    T=16
    fp32 F.linear                       47 / 227    337 / 519          45 / 187    322 / 472
    torch._weight_int8pack_mm (g 0)    554 / 563   9364 / 9552        567 / 565   9384 / 9465
    aten._weight_int8pack_mm (g 0)     569 / 568   9364 / 9453        573 / 573   9486 / 9434
    dequantize + F.linear (g 0)        150 / 165    427 / 447         144 / 157    419 / 433
    linear_int8, group 0                96 / 112    390 / 406          87 /  95    364 / 373
    linear_int8, group 64              136 / 150    428 / 443         122 / 132    397 / 413

`_weight_int8pack_mm` (per-row scales only; the aten op is the same kernel) is 5-30x slower
than fp32 here, so the kernel (`torch_ops.linear_int8`) dequantizes into a reused scratch
matrix and runs F.linear: group 0 converts and scales the output rows, group > 0 converts
and scales the groups in place. (A fresh dequantized temporary per call is as fast when
malloc reuses memory and ~3 ms when it faults fresh pages in; the scratch avoids that.)
Whole SmolLM2-135M decode step (fuse-qkv, fuse-gate-up, fold-rope-tables, paged-kv; head
float; median of 40 steps at context 64, best of 3, two runs):

    batch 1:   fp32 37.6 ms, group 64 32.6-34.1 ms, group 0 28.0-30.5 ms
    batch 16:  fp32 105.5 ms, group 64 107.7-110.1 ms, group 0 107.9-114.9 ms

and its weights go from 513 MiB to 216 MiB (group 64; 210 MiB with group 0), the ~297 MiB
freed joining the KV budget. Accuracy against the fp32 reference, SmolLM2-135M, 4 probes x
16 tokens: max |dlogit| 0.84 with group 64, 1.3 with group 0 (greedy tokens match up to
near-ties) — hence the default group 64, the usual accuracy/size trade (the scales add 1/16
of the int8 bytes); group 0 is the fastest. The tiny test models move by ~0.04.
"""
from __future__ import annotations

from vsc.errors import VscError
from vsc.ir.kernels import default_kernel
from vsc.ir.module import KernelRef, ModelGraph, ServingModule, Weight, layer_op_ids, walk_ops
from vsc.ir.rewrite import credit_freed_weight_bytes, times_run, unique_weight_name, variant_weight_name
from vsc.ir.sizes import weight_bytes
from vsc.ir.types import TensorType, pass_origin
from vsc.ir.weight_inits import int8_group_size
from vsc.passes.base import Option, Pass, register_pass


@register_pass
class WeightInt8(Pass):
    name = "weight-int8"
    summary = "per-group symmetric int8 weights for linear ops (int8 values + f32 scales, dequantized per call)"
    options = (
        Option("group", int, 64, "input columns per scale (0: one scale per output row)", minimum=0),
        Option("include_head", bool, False, "also quantize linears outside the layer region (the LM head) "
                                            "and weights shared with an embedding"),
    )
    may_change_outputs = True

    def apply(self, module: ServingModule) -> None:
        model, func = module.model, module.model.func
        origin = pass_origin(self.name)
        before = weight_bytes(model)
        embedded = {op.operands[1] for op in walk_ops(func.body) if op.kind == "embed"}
        layer_ops = layer_op_ids(func)
        quantized: dict[str, tuple[str, str]] = {}
        times = times_run(module)
        for op in walk_ops(func.body):
            if op.kind != "linear":
                continue
            weight = op.operands[1]
            is_head = id(op) not in layer_ops or weight in embedded
            if is_head and not self.include_head:
                continue
            if weight not in quantized:
                quantized[weight] = self._declare(model, weight, origin)
                self.stat("quantized", times[id(op)], "weights to int8")
            values, scales = quantized[weight]
            op.kind = "linear_int8"
            op.operands = [op.operands[0], values, scales, *op.operands[2:]]
            op.attrs = {"group": self.group}
            op.kernel = KernelRef(default_kernel("linear_int8"))
            op.origin = origin        # result type unchanged: x.with_last(out), as for linear
        credit_freed_weight_bytes(module, before, origin)

    def _declare(self, model: ModelGraph, weight: str, origin) -> tuple[str, str]:
        source = model.weight(weight)
        size, problem = int8_group_size(source.type, {"group": self.group})
        if problem:
            if self.group and source.type.rank == 2 and source.type.shape[1] % self.group:
                problem = (f"group={self.group} does not divide in_features {source.type.shape[1]} of {weight} "
                           f"(choose a divisor of {source.type.shape[1]}, or group=0 for one scale per output row)")
            raise VscError(problem)
        out, cols = source.type.shape
        values_name, scales_name = (unique_weight_name(model, variant_weight_name(weight, "i8", part))
                                     for part in ("weight", "scales"))
        attrs = {"group": self.group}
        new = [Weight(values_name, TensorType("i8", (out, cols)), "quantize_int8", [weight], dict(attrs), origin),
               Weight(scales_name, TensorType("f32", (out, cols // size)), "int8_scales", [weight], dict(attrs), origin)]
        at = model.weights.index(source) + 1
        model.weights[at:at] = new
        return values_name, scales_name
