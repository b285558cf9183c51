"""chunked-prefill{slo=true}: the spec's tightest tpot objective goes onto the prefill stage and into
the engine's config (the scheduler's prompt-token cap); without a tpot objective the pass refuses;
the verifier's rules for the objective, and for the removed native attention attribute."""
from __future__ import annotations

import pytest

from vsc.backends.server.emit import engine_config
from vsc.errors import PassFailure, PipelineError
from vsc.ir.module import walk_ops
from vsc.ir.printer import print_module
from vsc.ir.verifier import verify
from vsc.passes.manager import PassManager

PIPE = "paged-kv{block=16},continuous-batching{max_batch=8,max_tokens=512},chunked-prefill{tokens=128,slo=true}"


def with_slos(module, *slos):
    module.deployment["slos"] = [{"metric": m, "percentile": p, "op": "<=", "value": v} for m, p, v in slos]
    return module


def test_the_tightest_tpot_objective_reaches_the_engine(make_module):
    m = with_slos(make_module(), ("ttft", 99, 0.5), ("tpot", 50, 0.08), ("tpot", 99, 0.12))
    out = PassManager(PIPE).run(m)
    assert out.requests.stage("prefill").attrs["tpot_slo_ms"] == 80.0
    assert out.batching.chunked_prefill == 128
    assert verify(out) == []
    assert 'tpot_slo_ms = 80.0' in print_module(out)
    cfg = engine_config(out)
    assert cfg["prefill_tpot_ms"] == 80.0 and cfg["chunked_prefill"] == 128
    plain = PassManager(PIPE.replace(",slo=true", "")).run(with_slos(make_module(), ("tpot", 50, 0.08)))
    assert "prefill_tpot_ms" not in engine_config(plain)
    assert "tpot_slo_ms" not in plain.requests.stage("prefill").attrs


def test_without_a_tpot_objective_the_pass_refuses(make_module):
    m = with_slos(make_module(), ("ttft", 99, 0.5))
    with pytest.raises(PassFailure, match="needs a `tpot"):
        PassManager(PIPE).run(m)
    with pytest.raises(PipelineError, match="slo"):
        PassManager(PIPE.replace("slo=true", "slo=maybe")).run(make_module())


def test_the_verifier_holds_the_objective_to_a_positive_number_and_chunking(make_module):
    out = PassManager(PIPE).run(with_slos(make_module(), ("tpot", 50, 0.08)))
    out.requests.stage("prefill").attrs["tpot_slo_ms"] = -5
    assert any("tpot_slo_ms must be a positive" in e.message for e in verify(out))
    out.requests.stage("prefill").attrs["tpot_slo_ms"] = 80.0
    out.batching.chunked_prefill = 0
    assert any("caps chunked prefill" in e.message for e in verify(out))


def test_a_plan_asking_for_the_removed_native_kernel_is_refused(make_module):
    out = PassManager("paged-kv{block=16}").run(make_module())
    attn = next(op for op in walk_ops(out.model.func.body) if op.kind == "attention")
    attn.attrs["native"] = True
    assert any("C++ decode kernel, which was removed" in e.message for e in verify(out))
