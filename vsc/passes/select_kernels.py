"""select-kernels{target}: give every op the best kernel the catalog has for the target.

Pays on GPU targets, where Triton kernels (fused RMSNorm+residual, RoPE, SiLU-and-mul,
paged decode attention) replace torch's generic ops, and on CPU targets, where TVM kernels
that `vsc compile` builds for the host replace chains of eager torch calls (RMSNorm with its
residual add, RoPE rotation, SiLU-and-mul: 15-32 us of torch dispatch each -> 0.6-4 us at one
row, bench/RESULTS.md) and run block-quantized linears (q8_0/q4_0/q4_1 weights, which torch
can only dequantize per call). A kernel is chosen only where it fits the op's weight format
and element type (the TVM kernels are f32). Exact on fp32 up to the kernels' documented tolerance — the accuracy check
after lowering decides. The choice per op kind, target and cache layout comes from
`vsc.ir.kernels.best_kernel`; run it after the passes that change op kinds or the cache
layout (fusions, paged-kv), or the layout-dependent choice (attention) is stale.
"""
from __future__ import annotations

from vsc.errors import VscError
from vsc.ir.kernels import op_fitting_kernels
from vsc.ir.module import KernelRef, ServingModule, walk_ops
from vsc.ir.ops import OPS
from vsc.ir.rewrite import times_run
from vsc.ir.types import pass_origin
from vsc.passes.base import Option, Pass, register_pass


@register_pass
class SelectKernels(Pass):
    name = "select-kernels"
    summary = "assign each op the preferred kernel for the target (Triton on cuda, torch on cpu)"
    options = (Option("target", str, "auto", "target to select for (auto: the module's)", choices=("auto", "cpu", "cuda")),
               Option("activations", str, "auto", "tvm.quant_linear's activations: f32 (exact), q8_0 (int8 per "
                      "32-block, VNNI dot products: ~2x at one row, lossy), auto (q8_0 when the spec's accuracy bar "
                      "is a logits tolerance, f32 under greedy_exact)", choices=("auto", "f32", "q8_0")))
    may_change_outputs = True  # a different kernel may round differently

    def apply(self, module: ServingModule) -> None:
        target = module.target.kind if self.target == "auto" else self.target
        if target != module.target.kind:
            raise VscError(f"the module targets {module.target.kind}; kernels for {target} could not run on it")
        activations = self.activations
        if activations == "auto":
            bar = (module.deployment.get("accuracy") or {}).get("kind")
            activations = "q8_0" if bar == "logits_tol" else "f32"
        measured: dict[tuple, dict[str, float]] = {}
        times = times_run(module)
        for op in walk_ops(module.model.func.body):
            if OPS[op.kind].structural:
                continue
            fitting = op_fitting_kernels(module, op, target)
            if fitting is None:
                continue      # a packed weight's kernel: it stays
            choice = self._measured_choice(module, op, fitting, measured) or (fitting[0] if fitting else None)
            if choice is None:
                raise VscError(f"no kernel implements {op.kind} on {target} with a {module.cache.layout} "
                               f"{module.cache.dtype} cache")
            config = {"activations": activations} if choice == "tvm.quant_linear" and activations != "f32" else {}
            if op.kernel is None or op.kernel.name != choice or op.kernel.config != config:
                op.kernel = KernelRef(choice, config)
                op.origin = pass_origin(self.name)
                self.stat("selected", times[id(op)], f"{op.kind} ops -> {choice}")
        if any(len(c) >= 2 for c in measured.values()):     # the cost table behind the choices, in the plan for whoever reads the dump
            module.schedule.attrs = {**module.schedule.attrs, "kernel_costs": [
                {"op": kind, "shape": shape, "kernel": name, "us": round(us, 2)}
                for (kind, shape), costs in sorted(measured.items()) if len(costs) >= 2
                for name, us in sorted(costs.items())]}
            module.schedule.origin = pass_origin(self.name)

    def _measured_choice(self, module: ServingModule, op, fitting: list[str], measured: dict) -> str | None:
        """The fitting kernel that measured fastest on this target for the op's shapes, when a
        cost model measured at least two of them; None: keep the catalog's preference order."""
        if self.kernel_costs is None or len(fitting) < 2:
            return None
        main = op.operands[1] if len(op.operands) > 1 and op.operands[1].startswith("@") else None
        weight = f" x {module.model.weight(main).type}" if main and module.model.weight(main) else ""
        key = (op.kind, ", ".join(str(t) for t in op.types) + weight)
        if key not in measured:
            measured[key] = self.kernel_costs(module, op, fitting) or {}
        costs = measured[key]
        return min(costs, key=costs.get) if len(costs) >= 2 else None
