"""select-kernels with a cost model: the measured fastest fitting kernel wins, the table lands in
the plan, and the model measured on this machine really runs both candidates (and caches them)."""
from __future__ import annotations

import json

from vsc.backends.kernel_costs import MeasuredKernelCosts
from vsc.ir.module import walk_ops
from vsc.ir.parser import parse_module
from vsc.ir.printer import print_module
from vsc.ir.verifier import verify
from vsc.passes.manager import PassManager

PIPELINE = "paged-kv,continuous-batching{max_batch=4},select-kernels"


def kernels_of(module, kind):
    return {op.kernel.name for op in walk_ops(module.model.func.body) if op.kind == kind}


def test_without_a_cost_model_the_catalog_order_decides(make_module):
    out = PassManager(PIPELINE).run(make_module())
    assert kernels_of(out, "rmsnorm") == {"tvm.rmsnorm"}
    assert "kernel_costs" not in out.schedule.attrs


def test_the_measured_fastest_kernel_is_chosen_and_recorded(make_module):
    asked = []

    def costs(module, op, names):
        asked.append((op.kind, tuple(names)))
        return {name: (1.0 if name.startswith("torch.") else 9.0) for name in names}   # torch measured faster

    out = PassManager(PIPELINE, kernel_costs=costs).run(make_module())
    assert kernels_of(out, "rmsnorm") == {"torch.rmsnorm"}
    assert ("rmsnorm", ("tvm.rmsnorm", "torch.rmsnorm")) in asked        # candidates in catalog order
    table = out.schedule.attrs["kernel_costs"]
    assert {"op": "rmsnorm", "shape": "f32[T, 32] x f32[32]", "kernel": "tvm.rmsnorm", "us": 9.0} in table
    assert verify(out) == []
    text = print_module(out)
    assert print_module(parse_module(text, "x.vsir")) == text               # the table round-trips


def test_measured_costs_run_both_candidates_and_are_cached(make_module, tmp_path, monkeypatch):
    monkeypatch.setenv("VSC_KERNEL_COSTS", str(tmp_path / "costs.json"))
    monkeypatch.setenv("VSC_TVM_CACHE", str(tmp_path / "tvm"))
    module = PassManager("paged-kv,continuous-batching{max_batch=4}").run(make_module())
    norm = next(op for op in walk_ops(module.model.func.body) if op.kind == "rmsnorm")
    model = MeasuredKernelCosts()
    got = model(module, norm, ["tvm.rmsnorm", "torch.rmsnorm"])
    assert set(got) == {"tvm.rmsnorm", "torch.rmsnorm"} and all(us > 0 for us in got.values())
    assert len(json.loads((tmp_path / "costs.json").read_text())) == 2
    assert model(module, norm, ["torch.embedding"]) == {}                    # nothing to measure: no entry
    import vsc.backends.kernel_costs as kc
    monkeypatch.setattr(kc, "_candidate", lambda *a: (_ for _ in ()).throw(AssertionError("measured again")))
    assert MeasuredKernelCosts()(module, norm, ["tvm.rmsnorm", "torch.rmsnorm"]) == got
