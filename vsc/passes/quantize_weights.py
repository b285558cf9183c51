"""quantize-weights{format, include_head}: llama.cpp's block formats made from a float model.

What it changes. Each `linear` whose weight W is a float [out, in] matrix (in a multiple of
32) reads a derived, block-quantized copy instead, built once at load:

    weight @...q_proj_q4_1.weight : q4_1[576, 576] = quantize(@...q_proj.weight) {format = "q4_1"}
    %q = linear(%xn, @...q_proj_q4_1.weight) via tvm.quant_linear

The layouts are exactly those a GGUF file ships (`vsc.runtime.quant`: q8_0 = int8 values
with one f16 scale per 32; q4_0 = 4-bit values with a scale; q4_1 = 4-bit values with a
scale and a minimum), made by llama.cpp's reference quantizers, so an fp32 HF folder and a
GGUF of the same model meet in the same IR types and kernels, and `vsc search` can trade the
accuracy bar for speed: weights go from 4 bytes per element to 1.06 (q8_0), 0.56 (q4_0) or
0.63 (q4_1), and a batch-1 decode step streams that much less.

The kernel is the best one the catalog has for the target and format (select-kernels'
rule: a compiled TVM kernel on cpu). `include_head` also quantizes linears outside the layer
region (the LM head); a head tied to the embedding table then moves the embedding to the
quantized table too (`torch.embedding_quant` dequantizes the step's rows), so no float copy
stays. The fp32 source is dropped after load and the bytes freed join the KV budget (run
it before paged-kv / continuous-batching to let them size the cache from it).

Lossy (may_change_outputs): the accuracy check runs after it with the spec's bar; q8_0 moves
SmolLM2-135M's logits by ~0.1, the 4-bit formats by ~1 (bench/RESULTS.md), so a plan needs
a tolerance that admits it, e.g. `accuracy { logits_tol(2.0, probes = 4) }`.
"""
from __future__ import annotations

from vsc.errors import VscError
from vsc.ir.kernels import best_kernel
from vsc.ir.module import KernelRef, ModelGraph, ServingModule, Weight, layer_op_ids, walk_ops
from vsc.ir.rewrite import credit_freed_weight_bytes, times_run, unique_weight_name, variant_weight_name
from vsc.ir.sizes import weight_bytes
from vsc.ir.types import FLOAT_DTYPES, QUANT_DTYPES, TensorType, pass_origin
from vsc.passes.base import Option, Pass, register_pass


@register_pass
class QuantizeWeights(Pass):
    name = "quantize-weights"
    summary = "block-quantize float linear weights to a GGUF format (q8_0, q4_0, q4_1), as llama.cpp does"
    options = (
        Option("format", str, "q8_0", "block format of the quantized weights", choices=tuple(sorted(QUANT_DTYPES))),
        Option("include_head", bool, False, "also quantize the LM head (and a tied embedding table with it)"),
    )
    may_change_outputs = True

    def apply(self, module: ServingModule) -> None:
        model, func = module.model, module.model.func
        origin = pass_origin(self.name)
        before = weight_bytes(model)
        embeds = [op for op in walk_ops(func.body) if op.kind == "embed"]
        layer_ops = layer_op_ids(func)
        made: dict[str, str] = {}
        times = times_run(module)
        for op in walk_ops(func.body):
            if op.kind != "linear":
                continue
            weight = op.operands[1]
            source = model.weight(weight)
            if source is None or source.type.dtype not in FLOAT_DTYPES or source.type.rank != 2:
                continue
            if id(op) not in layer_ops and not self.include_head:
                continue
            if source.type.shape[1] % 32:
                raise VscError(f"quantize-weights: {weight} has in_features {source.type.shape[1]}, not a multiple of "
                               f"the 32-element blocks of {self.format}")
            if weight not in made:
                made[weight] = self._declare(model, source, origin)
                self.stat("quantized", times[id(op)], f"weights to {self.format}")
            self._retarget(module, op, made[weight], origin)
        if not made:
            raise VscError("quantize-weights found no float linear weight to quantize")
        for op in embeds:           # a tied head was quantized: the embedding reads the same blocks
            table = op.operands[1]
            if table in made:
                op.attrs = {**op.attrs, "dtype": model.weight(table).type.dtype}
                self._retarget(module, op, made[table], origin)
        credit_freed_weight_bytes(module, before, origin)

    def _retarget(self, module: ServingModule, op, weight: str, origin) -> None:
        kernel = best_kernel(op.kind, module.target.kind, module.cache.layout, module.cache.dtype, self.format)
        if kernel is None:
            raise VscError(f"no kernel reads {self.format} weights for {op.kind} on {module.target.kind}")
        op.operands = [op.operands[0], weight, *op.operands[2:]]
        op.kernel = KernelRef(kernel)
        op.origin = origin

    def _declare(self, model: ModelGraph, source: Weight, origin) -> str:
        name = unique_weight_name(model, variant_weight_name(source.name, self.format))
        at = model.weights.index(source) + 1
        model.weights.insert(at, Weight(name, TensorType(self.format, source.type.shape), "quantize", [source.name],
                                        {"format": self.format}, origin))
        return name
