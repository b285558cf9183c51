"""pack-linear-weights: the rewrite, its refusals, the verifier's packed-weight rule, and the
oneDNN kernel against F.linear."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vsc.errors import PassFailure
from vsc.ir.module import walk_ops
from vsc.ir.verifier import verify
from vsc.passes.manager import PassManager
from vsc.runtime.kernels.torch_ops import linear_onednn
from vsc.runtime.weights import DERIVED_INITS


def linears(module):
    return [op for op in walk_ops(module.model.func.body) if op.kind == "linear"]


def test_every_untied_linear_reads_a_packed_weight(make_module):
    m = make_module()
    out = PassManager("fuse-qkv,paged-kv,continuous-batching{max_batch=8},pack-linear-weights").run(m)
    for op in linears(out):
        w = out.model.weight(op.operands[1])
        assert op.kernel.name == "torch.linear_onednn" and w.init_fn == "onednn_pack" and w.init_attrs == {"batch": 8}
        assert w.type == out.model.weight(w.init_args[0]).type
    assert verify(out) == []
    no_head = PassManager("pack-linear-weights{include_head=false}").run(m)
    head = [op for op in linears(no_head) if op.kernel.name != "torch.linear_onednn"]
    assert len(head) == 1 and head[0].operands[1] == "@lm_head.weight"


def test_a_tied_head_is_never_packed(make_module):
    out = PassManager("pack-linear-weights").run(make_module("qwen2"))       # qwen2 here ties its head
    embedded = {op.operands[1] for op in walk_ops(out.model.func.body) if op.kind == "embed"}
    head = [op for op in linears(out) if op.operands[1] in embedded]
    assert head and all(op.kernel.name == "torch.linear" for op in head)


def test_fusing_after_packing_is_caught_by_the_verifier(make_module):
    m = PassManager("pack-linear-weights").run(make_module())
    with pytest.raises(PassFailure, match="packed weight"):
        PassManager("fuse-qkv").run(m)


def test_cuda_plans_are_refused(make_module):
    from vsc.ir.module import Target
    from vsc.ir.types import Origin
    m = make_module()
    m.target = Target("cuda", {"arch": "sm_90", "gpus": 1, "memory": 80 << 30}, Origin("spec", "t.vs", 1, 1))
    with pytest.raises(PassFailure, match="oneDNN on the CPU"):
        PassManager("pack-linear-weights").run(m)


@pytest.mark.parametrize("rows", [1, 16, 300])
def test_onednn_kernel_matches_f_linear(rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 40, generator=g)
    x = torch.randn(rows, 40, generator=g)
    packed = DERIVED_INITS["onednn_pack"]([w], {"batch": 16}, (96, 40))
    torch.testing.assert_close(linear_onednn(x, packed), F.linear(x, w), rtol=1e-5, atol=1e-5)
    bias = torch.randn(96, generator=g)
    torch.testing.assert_close(linear_onednn(x, packed, bias), F.linear(x, w, bias), rtol=1e-5, atol=1e-5)
