"""intra-op-threads: the cost model's choice, pinned counts, the verifier rule, and the
manifest entry the server applies at start."""
from __future__ import annotations

import pytest

from vsc.backends.server.emit import intra_op_threads
from vsc.errors import PassFailure
from vsc.ir.module import Target
from vsc.ir.types import Origin
from vsc.ir.verifier import verify
from vsc.passes.intra_op_threads import SMALL_GEMM_MACS, decode_gemm_macs
from vsc.passes.manager import PassManager


def two_cores(module):
    module.target.attrs["threads"] = 2
    return module


def test_small_gemms_get_one_thread(make_module):
    m = two_cores(make_module())
    out = PassManager("paged-kv,continuous-batching{max_batch=16},intra-op-threads").run(m)
    macs = decode_gemm_macs(out)
    # 2 layers x (qkv, o, gate, up, down) + the head; all tiny at hidden 32
    assert len(macs) == 2 * 7 + 1 and max(macs) < SMALL_GEMM_MACS
    assert out.schedule.attrs["intra_op_threads"] == 1
    assert out.schedule.origin.detail == "intra-op-threads"
    assert verify(out) == []
    assert intra_op_threads(out) == {"threads": 1, "cores": 2}
    assert "intra_op_threads" not in m.schedule.attrs          # the input is untouched


def test_big_gemms_keep_the_targets_threads(make_module):
    # SmolLM2-sized layers: ~17 M multiply-adds per GEMM at 16 sequences
    m = two_cores(make_module(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                              num_key_value_heads=3, vocab_size=4096))
    out = PassManager("paged-kv,continuous-batching{max_batch=16},intra-op-threads").run(m)
    assert sum(decode_gemm_macs(out)) / len(decode_gemm_macs(out)) >= SMALL_GEMM_MACS
    assert out.schedule.attrs["intra_op_threads"] == 2
    # the same model serving one sequence at a time: GEMVs, one thread
    one = PassManager("paged-kv,continuous-batching{max_batch=1},intra-op-threads").run(m)
    assert one.schedule.attrs["intra_op_threads"] == 1


def test_a_pinned_count_is_checked_against_the_target(make_module):
    m = two_cores(make_module())
    assert PassManager("intra-op-threads{threads=2}").run(m).schedule.attrs["intra_op_threads"] == 2
    with pytest.raises(PassFailure, match="more than the target's 2 threads"):
        PassManager("intra-op-threads{threads=3}").run(m)
    with pytest.raises(PassFailure, match="auto or a whole number"):
        PassManager("intra-op-threads{threads=many}").run(m)


def test_cuda_targets_keep_their_schedule_and_refuse_a_count(make_module):
    m = make_module()
    m.target = Target("cuda", {"arch": "sm_90", "gpus": 1, "memory": 80 << 30}, Origin("spec", "test.vs", 3, 3))
    assert "intra_op_threads" not in PassManager("intra-op-threads").run(m).schedule.attrs
    with pytest.raises(PassFailure, match="applies to cpu targets"):
        PassManager("intra-op-threads{threads=1}").run(m)


def test_verifier_rejects_more_threads_than_the_target_has(make_module):
    m = two_cores(make_module())
    m.schedule.attrs["intra_op_threads"] = 4
    problems = verify(m)
    assert [p.check for p in problems] == ["target"]
    assert "intra_op_threads must be an int in 1..2" in problems[0].message
