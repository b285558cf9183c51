"""native-attention: the C++ decode kernel against the torch kernel on the same paged cache,
its build cache, the pass's preconditions, and a compiled server that ships the kernel."""
from __future__ import annotations

import shutil

import pytest
import torch

from decode_steps import decode_step
from vsc.errors import PassFailure
from vsc.ir.module import walk_ops
from vsc.passes.manager import PassManager
from vsc.runtime.kernels.torch_ops import attention_metadata, paged_attention

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the native kernel")


@pytest.fixture(scope="module")
def native():
    from vsc.backends.native.build import build_native_kernels
    from vsc.runtime.kernels.native_ops import load_native_kernels

    built = build_native_kernels()
    assert build_native_kernels() == built                    # the second call is the cache
    return load_native_kernels("<no folder>", built.name, str(built))


def random_decode(gen, lengths, block_size, heads, kv_heads, hd):
    """A decode step over a cache of stale random values, blocks handed out scrambled."""
    order = torch.randperm(200, generator=gen).tolist()
    tables = [[order.pop() for _ in range(-(-n // block_size))] for n in lengths]
    return decode_step(tables, lengths, block_size, heads, kv_heads, hd, gen, num_blocks=200, scale=3.0)


@pytest.mark.parametrize("heads,kv_heads,hd,block", [(4, 2, 32, 16), (9, 3, 64, 16), (6, 1, 8, 4), (4, 4, 16, 8)])
def test_native_decode_matches_the_torch_kernel(native, heads, kv_heads, hd, block):
    gen = torch.Generator().manual_seed(heads * 100 + hd)
    batch, q, k, v, kc, vc = random_decode(gen, [1, 37, 150, 9, 64], block, heads, kv_heads, hd)
    plain = paged_attention(q, k, v, kc.clone(), vc.clone(), attention_metadata(batch, block), heads, kv_heads, hd, 0.2)
    meta = attention_metadata(batch, block)
    meta.native = native
    fast = paged_attention(q, k, v, kc.clone(), vc.clone(), meta, heads, kv_heads, hd, 0.2)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


def test_native_kernel_refuses_bad_input(native):
    q = torch.zeros(1, 2, 8)
    cache = torch.zeros(16, 1, 8)
    with pytest.raises(RuntimeError, match="context length outside the block table"):
        native.paged_decode_attention(q, cache, cache, torch.zeros(1, 1, dtype=torch.long),
                                      torch.tensor([5], dtype=torch.long), 4, 1.0)
    with pytest.raises(RuntimeError, match="block id outside the cache"):
        native.paged_decode_attention(q, cache, cache, torch.tensor([[9]], dtype=torch.long),
                                      torch.tensor([3], dtype=torch.long), 4, 1.0)


def test_the_pass_marks_attention_and_checks_the_plan(make_module):
    m = make_module()
    out = PassManager("paged-kv{block=16},native-attention").run(m)
    assert all(op.attrs["native"] is True for op in walk_ops(out.model.func.body) if op.kind == "attention")
    m.cache.dtype = "bf16"
    with pytest.raises(PassFailure, match="fp32 cache"):
        PassManager("paged-kv{block=16},native-attention").run(m)


def test_a_server_folder_carries_and_loads_its_own_copy(tmp_path):
    from vsc.driver import compile_to_server
    from vsc.frontend.lower import lower_spec
    from vsc.frontend.parser import parse_spec_text
    from vsc.models.tiny import make_tiny
    from vsc.runtime.kernels.native_ops import load_native_kernels

    model = make_tiny(tmp_path / "tiny-llama", arch="llama")
    spec = (f'deployment native {{\n model "{model}" {{ dtype = f32 }}\n target cpu {{ threads = 1, memory = 256 MiB }}\n'
            ' workload { arrivals = closed(2), prompt_tokens = fixed(16), output_tokens = fixed(8) }\n'
            ' accuracy { greedy_exact(probes = 2) }\n serve { max_context = 128 }\n}\n')
    module = lower_spec(parse_spec_text(spec, tmp_path / "n.vs"))
    result = compile_to_server(module, "paged-kv{block=16},native-attention", tmp_path / "server", None)
    assert "engine run exact" in result.accuracy_summary
    (so,) = (tmp_path / "server" / "kernels").glob("vsc_native_*.so")
    loaded = load_native_kernels(str(tmp_path / "server" / "model.py"), so.name, str(tmp_path / "not-built.so"))
    assert hasattr(loaded, "paged_decode_attention")
    with pytest.raises(RuntimeError, match="missing from .*kernels; recompile"):
        load_native_kernels(str(tmp_path / "elsewhere" / "model.py"), "vsc_native_0.so", str(tmp_path / "no.so"))
