"""intra-op-threads{threads=auto}: how many threads torch may use inside one op, on a CPU target.

Why a pass. Splitting a GEMM over OpenMP threads pays only when the GEMM is big enough to
amortize the fork/join: a decode step of a tiny model is ~20 GEMMs of ~1 M multiply-adds
each, and on this 2-core box running them on 2 threads made the step *slower* (tiny Llama,
16 sequences: 3.3 ms per decode forward on 2 threads vs 1.5 ms on 1, measured with
bench/profile_engine.py), while SmolLM2-135M's ~20 M-MAC GEMMs gain from 2 (103 -> 89 ms).
One thread also leaves a core to the HTTP event loop and the engine's Python, which run
beside every step.

`auto` decides from the plan: the mean multiply-adds per `linear` (or `linear_int8`) op of
one decode step at the plan's max_batch (the layer region's GEMMs counted once per layer,
the head once). Below SMALL_GEMM_MACS it chooses 1 thread; otherwise it leaves the target's
thread count (0: all cores). A number pins it (it must not exceed the target's threads). On a cuda target `auto` leaves
the plan alone (the host thread only launches kernels) and a number is refused.
The decision is `schedule {intra_op_threads = N}` in the IR; the server applies it with
torch.set_num_threads at start. Outputs do not change (one thread and two compute the
same sums; the final accuracy check runs either way).
"""
from __future__ import annotations

from vsc.errors import VscError
from vsc.ir.module import ServingModule, layer_op_ids, walk_ops
from vsc.ir.types import pass_origin
from vsc.passes.base import Option, Pass, register_pass

#: Mean multiply-adds per decode GEMM below which one thread wins (measured on the 2-core
#: box: tiny Llama ~0.9 M -> 1 thread 2.2x faster; SmolLM2-135M ~17 M -> 2 threads 1.16x faster).
SMALL_GEMM_MACS = 4_000_000

GEMM_KINDS = ("linear", "linear_int8")


def decode_gemm_macs(module: ServingModule) -> list[int]:
    """Multiply-adds of each GEMM one decode step runs at max_batch (layer GEMMs once per layer)."""
    model = module.model
    batch = max(1, int(module.batching.max_batch or 1))
    layers = int(model.attrs.get("layers", 1))
    layer_ops = layer_op_ids(model.func)
    macs: list[int] = []
    for op in walk_ops(model.func.body):
        if op.kind not in GEMM_KINDS:
            continue
        weight = model.weight(op.operands[1])
        if weight is None or weight.type.rank != 2:
            continue
        out_features, in_features = weight.type.shape
        macs.extend([batch * out_features * in_features] * (layers if id(op) in layer_ops else 1))
    return macs


@register_pass
class IntraOpThreads(Pass):
    name = "intra-op-threads"
    summary = "threads torch uses inside one op on a cpu target (auto: 1 when the decode GEMMs are too small to split)"
    options = (Option("threads", str, "auto", "auto, or a thread count (at most the target's threads)"),)

    def apply(self, module: ServingModule) -> None:
        target = module.target
        if target.kind != "cpu":
            if self.threads == "auto":     # host threads only launch kernels there: nothing to decide
                return
            raise VscError(f"intra-op-threads applies to cpu targets; this plan targets {target.kind}")
        available = int(target.attrs.get("threads") or 0)
        if self.threads == "auto":
            macs = decode_gemm_macs(module)
            mean = sum(macs) / len(macs) if macs else 0
            chosen = 1 if mean < SMALL_GEMM_MACS else available
        else:
            try:
                chosen = int(self.threads)
            except ValueError:
                raise VscError(f"threads must be auto or a whole number, got {self.threads!r}") from None
            if chosen < 1:
                raise VscError(f"threads must be at least 1, got {chosen}")
            if available and chosen > available:
                raise VscError(f"threads={chosen} is more than the target's {available} threads")
        module.schedule.attrs["intra_op_threads"] = chosen
        module.schedule.origin = pass_origin(self.name)
