"""fold-rope-tables{max_position}: RoPE's cos/sin become precomputed table weights, looked up
once per step before the layer loop.

What it changes. A plain `rope(%q, %k, %positions) {theta, head_dim}` computes its cos/sin
from the positions inside the op: every layer recomputes the same angles (an arange, a
pow, a multiply, a cat, cos and sin over [T, head_dim]). The pass

- declares the tables as derived weights, built once at load time:
  `weight @rope.cos : f32[max_position, head_dim] = rope_cos() {theta, head_dim}` (and `@rope.sin`);
- adds one function-level op before the layer `repeat` that reads the step's rows:
  `%rope_cos, %rope_sin = rope_lookup(%positions, @rope.cos, @rope.sin) : f32[T, hd], f32[T, hd]`
  (a region sees the function's values defined before it, as it sees `%positions`);
- rewrites each rope op to `rope_rotate(%q, %k, %rope_cos, %rope_sin) {head_dim}`, keeping
  its result names; a Triton `triton.rope` kernel stays (it implements both forms).

Exact: the table rows are the same fp32 math as the per-op angles (angle = position *
inv_freq, then cos/sin, cast to the model dtype), so outputs are bit-identical on the CPU.
(On cuda an unfolded rope computes its rows on the device, the tables are built on the CPU:
an ulp apart at most.)
One table pair per distinct (positions, theta, head_dim, dtype).

When it pays: always; most at decode on small models, where the per-op angle math is a
fixed cost per layer next to small matmuls. Measured on this machine (AVX-512 EPYC, one
thread, fp32; fuse-qkv, fuse-gate-up, paged-kv; one decode step at context 64, median of
300 steps (40 for SmolLM2), best of 3, two runs):

    tiny llama (4 layers, hidden 128):  batch 1   0.53 ms unfolded -> 0.44 ms folded  (-17%)
                                        batch 16  1.44 ms          -> 1.29 ms         (-11%)
    SmolLM2-135M (30 layers):           batch 1  37.3 ms           -> 36.3 ms         (-3%)
                                        batch 16 103.7 ms          -> 103.0 ms        (-1%)

The tables cost 2 x rows x head_dim x dtype bytes (SmolLM2-135M: 2 x 8192 x 64 x 4 B = 4 MiB),
the same bytes as the RotaryTable runners used to build unasked; they count in
`vsc.ir.sizes.weight_bytes` but, like that table, come out of the activation reserve, not
the KV budget (so the pass never shrinks a cache sized before it). Rope ops whose
positions are computed inside the layer region are left alone.
"""
from __future__ import annotations

from vsc.errors import VscError
from vsc.ir.kernels import KERNELS, default_kernel
from vsc.ir.module import KernelRef, NameAllocator, Op, ServingModule, Weight, walk_ops
from vsc.ir.ops import infer
from vsc.ir.rewrite import times_run, unique_weight_name
from vsc.ir.types import TensorType, pass_origin
from vsc.passes.base import Option, Pass, register_pass


def table_rows(module: ServingModule) -> int:
    """Positions a table covers by default: the model's max_position, or max_context if larger
    (the runner's MAX_POSITION)."""
    attrs = module.model.attrs
    return max(int(attrs.get("max_position", 0)), int(module.deployment.get("max_context") or 0))


@register_pass
class FoldRopeTables(Pass):
    name = "fold-rope-tables"
    summary = "precompute RoPE cos/sin tables as weights; one lookup per step before the layer loop"
    options = (
        Option("max_position", int, 0, "rows of each table (0: the model's max_position, or max_context if larger)",
               minimum=0),
    )

    def apply(self, module: ServingModule) -> None:
        func = module.model.func
        origin = pass_origin(self.name)
        rows = self.max_position or table_rows(module)
        max_context = int(module.deployment.get("max_context") or 0)
        if rows < max_context:
            raise VscError(f"max_position={rows} is below max_context {max_context}: "
                           "positions past the table would have no row")
        top_level = {name for name, _ in func.params} | {r for op in func.body for r in op.results}
        names = NameAllocator(func)
        lookups: dict[tuple, tuple[str, str]] = {}
        times = times_run(module)
        for top in list(func.body):
            for op in walk_ops([top]):
                if op.kind != "rope" or op.operands[2] not in top_level:
                    continue
                q_type = op.types[0]
                theta, head_dim = op.attrs["theta"], op.attrs["head_dim"]
                key = (op.operands[2], float(theta), head_dim, q_type.dtype)
                if key not in lookups:
                    lookups[key] = self._add_lookup(module, names, top, key, rows, origin)
                cos, sin = lookups[key]
                op.kind = "rope_rotate"
                op.operands = [op.operands[0], op.operands[1], cos, sin]
                op.attrs = {"head_dim": head_dim}
                info = KERNELS.get(op.kernel.name) if op.kernel is not None else None
                if info is None or "rope_rotate" not in info.ops:     # triton.rope does both forms
                    op.kernel = KernelRef(default_kernel("rope_rotate"))
                op.origin = origin
                self.stat("folded", times[id(op)], "rope ops")
        if lookups:
            self.stat("added", len(lookups), "cos/sin table pairs")

    def _add_lookup(self, module: ServingModule, names: NameAllocator, before: Op, key: tuple, rows: int,
                    origin) -> tuple[str, str]:
        """Declare the key's tables and insert their lookup just before `before` (a top-level op)."""
        positions, theta, head_dim, dtype = key
        model, body = module.model, module.model.func.body
        table_type = TensorType(dtype, (rows, head_dim))
        tables = []
        for which in ("cos", "sin"):
            name = unique_weight_name(model, f"@rope.{which}")
            model.weights.append(Weight(name, table_type, f"rope_{which}", [], {"theta": theta, "head_dim": head_dim},
                                        origin))
            tables.append(name)
        positions_type = dict(model.func.params).get(positions) or next(
            t for op in body for r, t in zip(op.results, op.types) if r == positions)
        results = [names.fresh("%rope_cos"), names.fresh("%rope_sin")]
        types = infer("rope_lookup", [positions_type, table_type, table_type], {})
        lookup = Op("rope_lookup", results, [positions, *tables], types, {},
                    KernelRef(default_kernel("rope_lookup")), origin)
        body.insert(body.index(before), lookup)
        return results[0], results[1]
