"""`serve { replicas = N, router = ... }`: the spec's scale-out lands on the IR (deployment replicas, a
route stage between tokenize and admit), survives printing and parsing, is checked by the verifier,
shows in the manifest's router entry; the replicate pass adds the same; bad input is one spec error."""
from __future__ import annotations

import pytest

from vsc.backends.server.emit import router_manifest
from vsc.errors import SpecError, VscError
from vsc.ir.parser import parse_module
from vsc.ir.printer import print_module
from vsc.ir.verifier import verify
from vsc.passes.manager import PassManager

from serve_spec import lower_serve_spec


def lowered(model, serve: str = "", slo: str = "tpot p50 <= 30 ms"):
    return lower_serve_spec(model, slo, serve)


def test_replicas_and_router_reach_the_ir_and_the_manifest(model):
    m = lowered(model, ", replicas = 3, router = round_robin", slo="ttft p99 <= 400 ms")
    assert m.deployment["replicas"] == 3
    assert m.requests.stage("route").attrs == {"policy": "round_robin", "ttft_slo_ms": 400.0}
    assert ("tokenize", "route") in m.requests.edges() and ("route", "admit") in m.requests.edges()
    assert ("tokenize", "admit") not in m.requests.edges()
    assert "replicas" not in m.deployment["serve"] and "router" not in m.deployment["serve"]   # one place each
    text = print_module(m)
    assert "replicas = 3" in text and 'stage route {policy = "round_robin", ttft_slo_ms = 400.0}' in text
    again = parse_module(text)
    assert verify(again) == [] and again.requests == m.requests and again.deployment == m.deployment
    assert router_manifest(again) == {"router": {"replicas": 3, "policy": "round_robin", "block_tokens": 16,
                                                 "prefix_blocks": 4, "max_batch": m.batching.max_batch,
                                                 "ttft_slo_ms": 400.0}}


def test_replicas_default_to_prefix_affinity_and_one_replica_has_no_route(model):
    m = lowered(model, ", replicas = 2")
    assert m.requests.stage("route").attrs == {"policy": "prefix_affinity", "prefix_blocks": 4}
    assert verify(m) == []
    one = lowered(model)
    assert one.requests.stage("route") is None and "replicas" not in one.deployment
    assert router_manifest(one) == {}
    assert lowered(model, ", replicas = 1").requests.stage("route") is None


@pytest.mark.parametrize("serve, message", [
    (", replicas = 2, router = random", "unknown router 'random' (one of: prefix_affinity, round_robin, least_loaded)"),
    (", router = round_robin", "router = round_robin routes among replicas; the serve block has one"),
    (", replicas = 0", "replicas must be a positive whole number"),
    (", replicas = 1.5", "replicas must be a whole number"),
])
def test_bad_scale_out_is_one_spec_error(model, serve, message):
    with pytest.raises(SpecError) as e:
        lowered(model, serve)
    assert message in str(e.value)


def test_the_replicate_pass_adds_what_the_spec_would(model):
    base = lowered(model, slo="ttft p99 <= 250 ms")
    out = PassManager("paged-kv{block=16},replicate{n=2,router=prefix_affinity,prefix_blocks=2}").run(base)
    assert out.deployment["replicas"] == 2
    assert out.requests.stage("route").attrs == {"policy": "prefix_affinity", "prefix_blocks": 2, "ttft_slo_ms": 250.0}
    assert router_manifest(out)["router"]["block_tokens"] == 16      # the paged cache's block
    with pytest.raises(VscError, match="already has a route stage"):
        PassManager("replicate{n=2}").run(lowered(model, ", replicas = 2"))
    with pytest.raises(VscError, match="prefix_blocks is prefix_affinity's"):
        PassManager("replicate{n=2,router=round_robin,prefix_blocks=2}").run(base)
    with pytest.raises(VscError, match="must be >= 2"):
        PassManager("replicate{n=1}").run(base)
