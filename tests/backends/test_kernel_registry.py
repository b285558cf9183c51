"""A kernel is declared once (vsc.runtime.kernel_registry) and usable everywhere it is named:
every declaration has its functions in its backend's runtime module, every kernel the IR can
name is declared, the Triton AOT signatures match the kernels' parameters, and one new
declaration reaches the catalog, the verifier, the code generator and the runtime."""
from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vsc.backends.server import emit
from vsc.backends.torch import codegen
from vsc.ir import kernels as catalog
from vsc.ir.ops import OPS
from vsc.runtime import kernel_registry as registry
from vsc.runtime.enums import KV_CACHE_LAYOUTS, TARGET_KINDS
from vsc.runtime.kernels import TORCH_KERNELS

DECLARED = registry.KERNELS
REPO = Path(__file__).resolve().parents[2]


def _backend_module(backend: str):
    if backend == "triton":
        pytest.importorskip("triton")
    return importlib.import_module(registry.BACKEND_MODULES[backend])


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_every_declared_kernel_has_a_function_for_each_op_it_implements(name):
    k = DECLARED[name]
    assert k.backend in registry.BACKEND_MODULES, f"{name}: unknown backend {k.backend!r}"
    assert set(k.ops) <= set(OPS), f"{name}: op kinds the IR does not define: {set(k.ops) - set(OPS)}"
    assert set(k.targets) <= set(TARGET_KINDS) and set(k.cache_layouts) <= set(KV_CACHE_LAYOUTS)
    if k.functions is None:           # run by the engine (the sampler), never by a runner
        assert set(k.ops) <= codegen._ENGINE_OPS
        return
    assert set(k.functions) == set(k.ops), f"{name}: functions for {sorted(k.functions)}, ops {sorted(k.ops)}"
    module = _backend_module(k.backend)
    for op, fn in k.functions.items():
        assert callable(getattr(module, fn, None)), f"{name} ({op}): {module.__name__} has no function {fn!r}"
    if k.fallback is not None:
        assert callable(getattr(_backend_module("torch"), k.fallback, None)), f"{name}: no torch_ops.{k.fallback}"


def test_every_kernel_the_ir_can_name_is_declared():
    assert list(catalog.KERNELS) == list(DECLARED)
    defaults = [*((op, k) for op, k in catalog.DEFAULT_KERNELS.items()),
                *((op, k) for op, k in catalog.QUANT_DEFAULT_KERNELS.items()),
                ("attention", catalog.PAGED_ATTENTION_KERNEL), ("attention", catalog.PAGED_ATTENTION_INT8_KERNEL)]
    for op, name in defaults:
        assert name in DECLARED and op in DECLARED[name].ops, f"the default kernel {name} of {op} is not declared for it"
    assert {b for order in catalog.BACKEND_PREFERENCE.values() for b in order} <= set(registry.BACKEND_MODULES)
    from vsc.backends.kernel_costs import _TORCH_MEASURED
    from vsc.passes.pack_linear_weights import KERNEL as PACKED
    assert PACKED in catalog.LAYOUT_BOUND_KERNELS
    for op, name in _TORCH_MEASURED.items():
        assert name in DECLARED, f"kernel_costs measures {op} on undeclared {name}"
    # every op kind the IR defines has a kernel (structural ops such as `repeat` excepted)
    assert {kind for kind, d in OPS.items() if not d.structural} <= {op for k in DECLARED.values() for op in k.ops}


def test_config_is_declared_only_where_the_code_generator_checks_it():
    # A TVM kernel's config is checked against its declaration; a torch kernel takes none; a
    # Triton kernel's config is the wrapper's meta-parameters, checked by triton_ops.
    assert all(not k.config for k in DECLARED.values() if k.backend != "tvm")
    from vsc.runtime.kernels import tvm_ops
    assert tvm_ops.ACTIVATIONS == DECLARED["tvm.quant_linear"].config["activations"]


def test_the_runtime_and_codegen_tables_follow_the_declarations():
    torch_run = {k.name for k in registry.backend_kernels("torch") if k.functions}
    assert set(TORCH_KERNELS) == torch_run
    for name, fn in TORCH_KERNELS.items():
        assert {fn.__name__} == set(DECLARED[name].functions.values())
    assert {k for k, _ in codegen._TRITON_WRAPPERS} == {k.name for k in registry.backend_kernels("triton")}
    assert {k for k, _ in codegen._TVM_FUNCTIONS} == {k.name for k in registry.backend_kernels("tvm")}
    assert set(emit.AOT_KERNELS) == {k.name for k in registry.backend_kernels("triton")}
    # the backends' targets: the code generator lowers tvm.* on cpu and triton.* on cuda only
    assert all(k.targets == ("cpu",) for k in registry.backend_kernels("tvm"))
    assert all(k.targets == ("cuda",) for k in registry.backend_kernels("triton"))


def test_every_compiled_step_kernel_has_a_translation_and_every_tvm_kernel_a_library_entry():
    from vsc.backends.tvm import decode_step, plan

    translated = inspect.getsource(decode_step.make_relax_module)
    for name in catalog.COMPILED_STEP_KERNELS:
        assert f'"{name}"' in translated, f"{name} is declared compiled_step but decode_step does not translate it"
    library = inspect.getsource(plan.plan_kernel_specs)
    for k in registry.backend_kernels("tvm"):
        assert f'"{k.name}"' in library, f"{k.name}: plan_kernel_specs builds nothing for it"


# --- Triton: the ahead-of-time signatures ---------------------------------------------------------


def test_aot_signatures_match_the_triton_kernels_parameters():
    pytest.importorskip("triton")
    from vsc.runtime.kernels import triton_ops

    for spec in triton_ops.KERNELS.values():
        params = spec.jit_function().params
        runtime = [p.name for p in params if not p.is_constexpr]
        assert list(spec.signature) == runtime, f"{spec.name}: declared {list(spec.signature)}, kernel takes {runtime}"
        assert set(spec.signature.values()) <= {"*{dt}", "*i64", "i32", "fp32"}, spec.name
        assert spec.ir_kernel == registry.aot_ir_kernel(spec.name)


def test_every_declared_aot_kernel_has_variants_for_each_dtype():
    pytest.importorskip("triton")
    from vsc.backends.triton.aot import variants
    from vsc.runtime.kernels import triton_ops

    built = {(v.kernel, v.signature[next(n for n, t in v.signature.items() if t.startswith("*"))]) for v in variants()}
    for k in registry.backend_kernels("triton"):
        assert k.aot, f"{k.name} declares no ahead-of-time kernels: a cuda server could not ship it"
        for name in k.aot:
            assert name in triton_ops.KERNELS, f"{k.name}: no triton_ops kernel {name!r}"
            for dt in ("fp32", "bf16"):
                assert (name, f"*{dt}") in built, f"{k.name}: no {dt} variant of {name}"


def _launched(module, fn_name: str, seen: set[str]) -> set[str]:
    """The triton_ops kernels a wrapper launches (`_launch(SPEC, ...)`), following its calls to the
    module's other functions."""
    if fn_name in seen:
        return set()
    seen.add(fn_name)
    out = set()
    for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(getattr(module, fn_name))))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            callee = getattr(module, node.func.id, None)
            if node.func.id == "_launch":
                out.add(getattr(module, node.args[0].id).name)
            elif inspect.isfunction(callee) and callee.__module__ == module.__name__:
                out |= _launched(module, node.func.id, seen)
    return out


def test_the_aot_kernels_are_those_the_wrappers_launch():
    # A cuda server ships the AOT kernels of its plan's IR kernels: one a wrapper launches but
    # the declaration does not list would be missing from server/kernels/.
    pytest.importorskip("triton")
    from vsc.runtime.kernels import triton_ops

    for k in registry.backend_kernels("triton"):
        launched = set().union(*(_launched(triton_ops, fn, set()) for fn in k.functions.values()))
        assert set(k.aot) == launched, f"{k.name}: declares aot {sorted(k.aot)}, its wrappers launch {sorted(launched)}"


# --- adding a kernel: one declaration ---------------------------------------------------------------

# A child process declares one new kernel (a second residual add, run by torch_ops.add) before
# anything reads the registry; the catalog offers it, the verifier accepts a plan naming it,
# the code generator lowers it and the runner computes what the plan with torch.add does.
_NEW_KERNEL = """
import sys
from pathlib import Path

import torch

from vsc.runtime import kernel_registry
kernel_registry.KERNELS["torch.add_again"] = kernel_registry.declare("torch.add_again", "add", "add",
                                                                     doc="a test's new kernel")

from vsc.backends.torch.codegen import generate_runner_source, load_runner_class
from vsc.frontend.lower import lower_spec
from vsc.frontend.parser import parse_spec_text
from vsc.ir.kernels import fitting_kernels
from vsc.ir.module import KernelRef, walk_ops
from vsc.ir.verifier import verify_or_raise
from vsc.models.tiny import make_tiny
from vsc.runtime.api import StepBatch

torch.set_num_threads(1)
assert "torch.add_again" in fitting_kernels("add", "cpu", "contiguous")
model = make_tiny(Path(sys.argv[1]) / "tiny-llama")
spec = '''deployment new_kernel {
  model "MODEL" { dtype = f32 }
  target cpu { threads = 1, memory = 1 GiB }
  workload { arrivals = closed(1), prompt_tokens = fixed(8), output_tokens = fixed(4) }
  serve { max_context = 64 }
}
'''.replace("MODEL", str(model))
logits = []
for kernel in ("torch.add", "torch.add_again"):
    module = lower_spec(parse_spec_text(spec, str(model.parent / "t.vs")))
    adds = [op for op in walk_ops(module.model.func.body) if op.kind == "add"]
    assert adds
    for op in adds:
        op.kernel = KernelRef(kernel, {})
    verify_or_raise(module)
    source = generate_runner_source(module)
    assert kernel in source.split("# kernels: ", 1)[1].splitlines()[0]
    runner = load_runner_class(source, "new_kernel_" + kernel.replace(".", "_"))(module.model.attrs["path"])
    runner.create_kv_cache()
    n = 8
    batch = StepBatch(torch.arange(3, 3 + n), torch.arange(n), torch.tensor([0, n]), torch.tensor([n]),
                      torch.tensor([[0]]), torch.arange(n), query_lens_host=[n], context_lens_host=[n])
    logits.append(runner.prefill(batch))
assert torch.equal(logits[0], logits[1])
print("ok")
"""


def test_adding_a_kernel_is_one_declaration(tmp_path):
    done = subprocess.run([sys.executable, "-c", _NEW_KERNEL, str(tmp_path)], capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
