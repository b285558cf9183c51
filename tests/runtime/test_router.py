"""The ingress's router (vsc.runtime.router): prefix affinity keeps a shared prefix on one replica and
falls back to the least-loaded one when the preferred replica would miss the TTFT objective (or its
batch is full); round robin and least loaded; a replica that is down is routed around."""
from __future__ import annotations

import pytest

from vsc.runtime.router import Router, RouterConfig, prefix_key

SYSTEM = list(range(100, 164))         # 64 tokens: four 16-token blocks


def prompts(n: int, prefix=SYSTEM):
    return [prefix + [1000 + i, 2000 + i, 7] for i in range(n)]


def test_a_shared_prefix_goes_to_one_replica_and_other_prefixes_spread():
    r = Router(RouterConfig(replicas=4, block_tokens=16, prefix_blocks=4))
    chosen = {r.choose(p)[0] for p in prompts(20)}
    assert len(chosen) == 1
    assert r.choose(prompts(1)[0]) == (chosen.pop(), "affinity")
    spread = {r.choose([s * 1000 + t for t in range(64)])[0] for s in range(1, 40)}
    assert len(spread) == 4                          # distinct prefixes use every replica


def test_only_the_leading_blocks_count():
    k = prefix_key(SYSTEM + [1, 2, 3], 16, 2)
    assert k == prefix_key(SYSTEM[:32] + [9] * 40, 16, 2)        # same first two blocks
    assert k != prefix_key([0] + SYSTEM[1:], 16, 2)
    assert prefix_key(SYSTEM[:15], 16, 2) is None                 # no full block: nothing cached to find


def test_a_prompt_without_a_full_block_goes_to_the_least_loaded():
    r = Router(RouterConfig(replicas=2, block_tokens=16))
    r.dispatched(0, "x")
    assert r.choose([1, 2, 3]) == (1, "no_prefix")


def test_ttft_fallback_when_the_preferred_queue_would_miss_the_objective():
    r = Router(RouterConfig(replicas=2, block_tokens=16, ttft_slo_ms=100.0))
    p = prompts(1)[0]
    pref, _ = r.choose(p)
    other = 1 - pref
    for i in (pref, other):          # both measured: 40 ms per request waiting for its first token
        r.first_event(i, 0.04, r.dispatched(i, "affinity"))
        r.finished(i, started=True)
    r.dispatched(pref, "affinity")   # one waiting: 2 x 40 = 80 ms <= 100: stay
    assert r.choose(p) == (pref, "affinity")
    r.dispatched(pref, "affinity")   # two waiting: 3 x 40 = 120 ms > 100, the other predicts 40 ms
    assert r.choose(p) == (other, "ttft_fallback")


def test_batch_fallback_without_an_objective():
    r = Router(RouterConfig(replicas=2, block_tokens=16, max_batch=2))
    p = prompts(1)[0]
    pref, _ = r.choose(p)
    r.dispatched(pref, "affinity")
    assert r.choose(p) == (pref, "affinity")
    r.dispatched(pref, "affinity")
    assert r.choose(p) == (1 - pref, "batch_fallback")
    r.update_load(1 - pref, 5)       # the other engine's own queue (other ingresses) is fuller
    assert r.choose(p) == (pref, "affinity")


def test_round_robin_and_least_loaded():
    rr = Router(RouterConfig(replicas=3, policy="round_robin"))
    assert [rr.choose(p)[0] for p in prompts(6)] == [0, 1, 2, 0, 1, 2]
    ll = Router(RouterConfig(replicas=3, policy="least_loaded"))
    ll.dispatched(0, "x"), ll.dispatched(1, "x")
    assert ll.choose(prompts(1)[0]) == (2, "least_loaded")


def test_a_replica_that_is_down_is_routed_around_and_only_its_prefixes_move():
    r = Router(RouterConfig(replicas=3, block_tokens=16))
    keys = [[s * 1000 + t for t in range(64)] for s in range(1, 30)]
    before = [r.choose(k)[0] for k in keys]
    r.set_up(1, False)
    after = [r.choose(k)[0] for k in keys]
    assert 1 not in after
    assert all(b == a for b, a in zip(before, after) if b != 1)
    assert r.choose(keys[0], exclude={0, 1, 2}) == (None, "none_up")
    r.set_up(0, False), r.set_up(2, False)
    assert r.choose(keys[0])[0] is not None       # all down: try one anyway (Ray Serve may have replaced it)


@pytest.mark.parametrize("entry, message", [
    ({"replicas": 2, "policy": "random"}, "unknown router policy 'random'"),
    ({"replicas": 0}, "replicas must be an int >= 1"),
    ({"replicas": 2, "block_tokens": True}, "block_tokens must be an int >= 1"),
])
def test_a_bad_router_entry_is_refused(entry, message):
    with pytest.raises(ValueError, match=message):
        RouterConfig(**entry)
