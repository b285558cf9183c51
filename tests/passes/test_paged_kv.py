"""paged-kv: the capacity it sizes from the budget (vsc.ir.rewrite.paged_kv_capacity, shared with
kv-int8) and the two ways a `tokens` option or a budget can fail to fit."""
from __future__ import annotations

import pytest

from vsc.errors import PassFailure
from vsc.ir.sizes import kv_bytes_per_token
from vsc.passes.manager import PassManager


def test_capacity_is_the_budget_or_tokens_in_whole_blocks(make_module):
    m = make_module()
    per_token = kv_bytes_per_token(m.model.attrs, "f32")
    out = PassManager("paged-kv{block=16}").run(m)
    assert out.cache.layout == "paged" and out.cache.block_size == 16
    assert out.cache.capacity_tokens == m.cache.budget_bytes // per_token // 16 * 16
    assert PassManager("paged-kv{block=16,tokens=1000}").run(m).cache.capacity_tokens == 992


def test_tokens_beyond_the_budget_are_refused(make_module):
    m = make_module()
    with pytest.raises(PassFailure, match=r"tokens=100000000 needs [\d.]+ GiB of KV cache, the budget is 4.00 MiB"):
        PassManager("paged-kv{block=16,tokens=100000000}").run(m)


def test_a_budget_without_room_for_one_block_is_refused(make_module):
    m = make_module()
    m.cache.budget_bytes = kv_bytes_per_token(m.model.attrs, "f32") * 15
    with pytest.raises(PassFailure, match=r"holds no 16-token block"):
        PassManager("paged-kv{block=16}").run(m)
