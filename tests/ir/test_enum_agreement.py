"""The verifier accepts exactly the attribute values the runtime can run (vsc.runtime.enums
declares each value set once): a plan `vsc verify` calls valid never dies in the runtime."""
from __future__ import annotations

import pytest

from vsc.ir.module import KernelRef
from vsc.ir.verifier import verify
from vsc.runtime import enums
from vsc.runtime.api import EngineConfig
from vsc.runtime.block_manager import BlockManager
from vsc.runtime.scheduler import Scheduler
from ir_queries import layer_region

CANDIDATES = sorted({v for name in dir(enums) if name.isupper() for v in getattr(enums, name)}
                    | {"hash", "bogus", ""})


def runtime_accepts(**config) -> bool:
    try:
        Scheduler(EngineConfig(max_context=32, **config), BlockManager(8, 4))
    except ValueError:
        return False
    return True


def paged(m):
    m.cache.layout, m.cache.block_size = "paged", 16
    m.cache.capacity_tokens = 512
    next(op for op in layer_region(m).ops if op.kind == "attention").kernel = KernelRef("torch.paged_attention")
    return m


def verifier_refuses(m, needle: str) -> bool:
    return any(needle in d.message for d in verify(m))


@pytest.mark.parametrize("value", CANDIDATES)
def test_prefix_sharing_values_agree(make_module, value):
    m = paged(make_module())
    m.cache.prefix_sharing = value
    assert not verifier_refuses(m, "prefix_sharing must be") == runtime_accepts(prefix_cache=value)


@pytest.mark.parametrize("value", CANDIDATES)
@pytest.mark.parametrize("field", ["mode", "order", "preemption"])
def test_batching_values_agree(make_module, field, value):
    m = make_module()
    setattr(m.batching, field, value)
    assert not verifier_refuses(m, f"{field} must be one of") == runtime_accepts(**{field: value})


def test_hash_prefix_sharing_is_a_verifier_diagnostic(make_module):
    """It was accepted by the verifier and died in the scheduler with a raw ValueError."""
    m = paged(make_module())
    m.cache.prefix_sharing = "hash"
    diags = verify(m)
    assert [d.check for d in diags] == ["cache"]
    assert "prefix_sharing must be one of none, radix, got 'hash'" in diags[0].message
