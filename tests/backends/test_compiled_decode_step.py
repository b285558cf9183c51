"""compile-decode-step: the plan's decode forward as one Relax VM function — the pass and the
verifier's rules, and a compiled server whose one-call decode step matches its eager forward."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from vsc.errors import PassFailure
from vsc.ir.module import walk_ops
from vsc.ir.verifier import verify
from vsc.passes.manager import PassManager
from vsc.runtime.api import StepBatch

QUANT = "fold-rope-tables,paged-kv{block=16},continuous-batching{max_batch=4,max_tokens=256},quantize-weights{format=q8_0,include_head=true}"
SELECT = QUANT + ",select-kernels{activations=f32}"


def test_the_pass_sets_the_graph_and_refuses_plans_without_a_compiled_form(make_module):
    out = PassManager(SELECT + ",compile-decode-step").run(make_module())
    assert out.schedule.attrs["graph"] == "relax" and not verify(out)
    back = PassManager("compile-decode-step{form=eager}").run(out)
    assert back.schedule.attrs["graph"] == "eager"
    moved = PassManager(QUANT + ",compile-decode-step").run(make_module())    # no select-kernels: it moves the ops
    assert {op.kernel.name for op in walk_ops(moved.model.func.body) if op.kind == "attention"} == {"tvm.paged_attention"}
    # linears packed for oneDNN stay there: no compiled form, said per op kind
    with pytest.raises(PassFailure, match="linear via torch.linear_onednn has no compiled form"):
        PassManager("fold-rope-tables,paged-kv{block=16},continuous-batching{max_batch=4,max_tokens=256},"
                    "pack-linear-weights,select-kernels,compile-decode-step").run(make_module())
    with pytest.raises(PassFailure, match="run fold-rope-tables first"):
        PassManager("paged-kv{block=16},continuous-batching{max_batch=4,max_tokens=256},select-kernels,"
                    "compile-decode-step").run(make_module())
    # a float plan compiles too: compile-decode-step moves the linears onto tvm.linear
    f32 = PassManager("fold-rope-tables,paged-kv{block=16},continuous-batching{max_batch=4,max_tokens=256},"
                      "compile-decode-step").run(make_module())
    assert f32.schedule.attrs["graph"] == "relax"
    assert {op.kernel.name for op in walk_ops(f32.model.func.body) if op.kind == "linear"} == {"tvm.linear"}


def test_the_verifier_holds_a_relax_graph_to_its_kernels(make_module):
    m = PassManager("fold-rope-tables,paged-kv{block=16},continuous-batching{max_batch=4,max_tokens=256},"
                    "prefix-cache,cascade-attention,select-kernels").run(make_module())
    m.schedule.attrs["graph"] = "relax"
    assert any("graph = relax: attention with cascade-attention runs eagerly" in str(d)
               for d in verify(m))
    m.schedule.attrs["graph"] = "cuda-graph"
    assert any("graph must be one of eager, relax" in str(d) for d in verify(m))


def _tiny_server(tmp, passes: str, streams: int):
    """(server folder, model folder, compile result) of a tiny Llama compiled with `passes`."""
    from vsc.driver import compile_to_server
    from vsc.frontend.lower import lower_spec
    from vsc.frontend.parser import parse_spec_text
    from vsc.models.tiny import make_tiny

    model = make_tiny(tmp / "tiny-llama", arch="llama")
    spec = (f'deployment relax {{\n model "{model}" {{ dtype = f32 }}\n target cpu {{ threads = 1, memory = 256 MiB }}\n'
            f' workload {{ arrivals = closed({streams}), prompt_tokens = fixed(16), output_tokens = fixed(8) }}\n'
            ' accuracy { logits_tol(1.0, probes = 2) }\n serve { max_context = 128 }\n}\n')
    module = lower_spec(parse_spec_text(spec, tmp / "r.vs"))
    return tmp / "server", model, compile_to_server(module, passes, tmp / "server", None)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    return _tiny_server(tmp_path_factory.mktemp("relax"), SELECT + ",compile-decode-step", 4)


def _runner(server, model):
    spec = importlib.util.spec_from_file_location("relax_server_model", server / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    runner = mod.Runner(str(model))
    runner.create_kv_cache(32)
    return mod, runner


def _batch(tables, lens, new, block):
    """A step giving each sequence `new[b]` tokens ending at context length lens[b]."""
    tokens, positions, slots, starts = [], [], [], [0]
    for t, n, c in zip(tables, new, lens):
        for p in range(c - n, c):
            tokens.append((7 * p + 3 * len(starts)) % 200 + 1)
            positions.append(p)
            slots.append(t[p // block] * block + p % block)
        starts.append(starts[-1] + n)
    width = max(len(t) for t in tables)
    L = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return StepBatch(tokens=L(tokens), positions=L(positions), query_start=L(starts), context_lens=L(lens),
                     block_tables=L([t + [0] * (width - len(t)) for t in tables]), slot_mapping=L(slots),
                     is_decode=all(n == 1 for n in new), query_lens_host=list(new), context_lens_host=list(lens))


def test_a_compiled_server_ships_the_step_and_matches_its_eager_forward(server):
    folder, model, result = server
    assert "engine run" in result.accuracy_summary
    assert any(p.name.startswith("vsc_step_") for p in (folder / "kernels").iterdir())
    mod, runner = _runner(folder, model)
    assert mod.STEP_MAX_BATCH == 4 and "qs" in {part for _, part in mod.STEP_ARGUMENTS}
    block = mod.BLOCK_SIZE
    # three sequences: one token, ending mid-block, ending on a block edge (blocks scrambled)
    tables, lens = [[5], [9, 2], [7, 3, 11]], [1, 20, 48]
    prompt = [n - 1 for n in lens]                              # their contexts first, by an eager prefill
    keep = [i for i, n in enumerate(prompt) if n]
    runner.prefill(_batch([tables[i] for i in keep], [prompt[i] for i in keep], [prompt[i] for i in keep], block))
    step = _batch(tables, lens, [1, 1, 1], block)
    saved = [(k.clone(), v.clone()) for k, v in runner.kv_cache]
    compiled = runner.decode(step)                                  # one Relax VM call
    written = [(k.clone(), v.clone()) for k, v in runner.kv_cache]
    for (k, v), (k0, v0) in zip(runner.kv_cache, saved):
        k.copy_(k0)
        v.copy_(v0)
    eager = runner.forward(step, mod.attention_metadata(step, block))
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    for pair_c, pair_e in zip(written, runner.kv_cache):
        for c, e in zip(pair_c, pair_e):
            torch.testing.assert_close(c, e, rtol=0, atol=1e-6)


def test_more_rows_than_the_plan_holds_run_eagerly(server):
    folder, model, _ = server
    mod, runner = _runner(folder, model)
    tables = [[i] for i in range(6)]                     # 6 sequences > STEP_MAX_BATCH = 4
    step = _batch(tables, [1] * 6, [1] * 6, mod.BLOCK_SIZE)
    calls = []
    runner.step = lambda *a: calls.append(a)             # the compiled step must not be called
    out = runner.decode(step)
    assert out.shape == (6, mod.VOCAB) and not calls


@pytest.fixture(scope="module")
def wide_server(tmp_path_factory):
    """A plan whose quantized linears take int8 activations, max_batch 8: the step also has its
    GEMM form (decode_wide), which the runner calls from GEMM_MIN_ROWS rows on."""
    from vsc.runtime.kernels import tvm_ops

    if not tvm_ops.host_has_vnni():
        pytest.skip("host CPU has no AVX-512 VNNI")
    passes = ("fold-rope-tables,paged-kv{block=16},continuous-batching{max_batch=8,max_tokens=256},"
              "quantize-weights{format=q8_0,include_head=true},select-kernels{activations=q8_0},compile-decode-step")
    folder, model, _ = _tiny_server(tmp_path_factory.mktemp("relax_wide"), passes, 8)
    return folder, model


def test_the_wide_step_runs_from_gemm_min_rows_and_matches_the_narrow_one(wide_server):
    from vsc.runtime.kernels import tvm_ops

    folder, model = wide_server
    mod, runner = _runner(folder, model)
    step_fn = runner.step
    assert step_fn.wide is not None
    block = mod.BLOCK_SIZE
    tables = [[i + 1, i + 9] for i in range(8)]
    lens = [3 + 2 * i for i in range(8)]
    prompt = [n - 1 for n in lens]
    runner.prefill(_batch(tables, prompt, prompt, block))
    saved = [(k.clone(), v.clone()) for k, v in runner.kv_cache]

    def restore():
        for (k, v), (k0, v0) in zip(runner.kv_cache, saved):
            k.copy_(k0)
            v.copy_(v0)

    called = []
    for name in ("fn", "wide"):
        real = getattr(step_fn, name)
        setattr(step_fn, name, lambda *a, _r=real, _n=name: (called.append(_n), _r(*a))[1])
    outs = {}
    for rows in (tvm_ops.GEMM_MIN_ROWS - 1, tvm_ops.GEMM_MIN_ROWS):
        step = _batch(tables[:rows], lens[:rows], [1] * rows, block)
        outs[rows] = runner.decode(step)
        restore()
        eager = runner.forward(step, mod.attention_metadata(step, block))
        restore()
        torch.testing.assert_close(outs[rows], eager, rtol=1e-4, atol=1e-4)
    assert called == ["fn", "wide"]
    # the two forms agree row for row (same int8 activations; fp32 summation order differs)
    torch.testing.assert_close(outs[tvm_ops.GEMM_MIN_ROWS][:-1], outs[tvm_ops.GEMM_MIN_ROWS - 1], rtol=1e-4, atol=1e-4)
