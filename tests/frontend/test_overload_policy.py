"""`serve { overload = queue | shed }`: the spec's choice (by default shed when the slo block bounds
TTFT) lands on the IR's admit stage, survives printing and parsing, is checked by the verifier and
reaches the server's EngineConfig."""
from __future__ import annotations

import pytest

from vsc.backends.server.emit import admission_engine_config, engine_config
from vsc.ir.parser import parse_module
from vsc.ir.printer import print_module
from vsc.ir.verifier import verify
from vsc.runtime.api import EngineConfig

from serve_spec import lower_serve_spec


def lowered(model, slo: str, serve: str = ""):
    return lower_serve_spec(model, slo, serve)


def test_a_ttft_objective_sheds_by_default(model):
    m = lowered(model, "ttft p99 <= 200 ms, ttft p50 <= 150 ms, tpot p50 <= 30 ms")
    assert m.requests.stage("admit").attrs == {"overload": "shed", "ttft_slo_ms": 150.0}    # the tightest bound
    text = print_module(m)
    assert 'stage admit {overload = "shed", ttft_slo_ms = 150.0}' in text
    assert "overload" not in str(m.deployment["serve"])     # one place in the IR: the admit stage
    again = parse_module(text)
    assert again.requests.stage("admit").attrs == m.requests.stage("admit").attrs
    assert verify(again) == []
    cfg = admission_engine_config(again)
    assert cfg == {"overload": "shed", "ttft_slo_ms": 150.0}
    assert EngineConfig(**engine_config(again), **cfg).overload == "shed"
    assert "overload" not in engine_config(again)      # the accuracy check's engine serves every probe


def test_without_a_ttft_objective_or_when_asked_it_queues(model):
    for m in (lowered(model, "tpot p50 <= 30 ms"), lowered(model, "ttft p99 <= 200 ms", ", overload = queue")):
        assert m.requests.stage("admit").attrs == {"overload": "queue"}
        assert verify(m) == []
        assert admission_engine_config(m) == {"overload": "queue"}
    assert lowered(model, "ttft p99 <= 1 s", ", overload = shed").requests.stage("admit").attrs["ttft_slo_ms"] == 1000.0


def test_a_plan_without_the_attribute_still_queues(model):
    m = lowered(model, "tpot p50 <= 30 ms")
    m.requests.stage("admit").attrs.clear()         # a plan printed before the stage carried a policy
    assert verify(m) == [] and admission_engine_config(m) == {}
    assert EngineConfig(max_context=128).overload == "queue"


@pytest.mark.parametrize("attrs, message", [
    ({"overload": "drop"}, "overload must be one of queue, shed, got 'drop'"),
    ({"overload": "shed"}, "overload = shed needs ttft_slo_ms"),
    ({"overload": "shed", "ttft_slo_ms": 0}, "overload = shed needs ttft_slo_ms"),
    ({"overload": "shed", "ttft_slo_ms": True}, "overload = shed needs ttft_slo_ms"),
])
def test_the_verifier_checks_the_admit_stage(model, attrs, message):
    m = lowered(model, "ttft p99 <= 200 ms")
    m.requests.stage("admit").attrs = attrs
    diags = [d for d in verify(m) if d.check == "requests" and d.node == "stage admit"]
    assert len(diags) == 1 and message in diags[0].message
