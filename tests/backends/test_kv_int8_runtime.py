"""kv-int8 at run time: int8 quantization, the QuantizedKV cache, paged_attention_int8 against a
dense reference, and a generated runner whose plan has an int8 cache."""
from __future__ import annotations

import zlib

import pytest
import torch

from vsc.backends.torch.codegen import generate_runner_source, load_runner_class
from vsc.frontend.lower import lower_spec
from vsc.frontend.parser import parse_spec_text
from vsc.models.tiny import make_tiny
from vsc.passes.manager import PassManager
from vsc.runtime.api import StepBatch
from vsc.runtime.kernels import torch_ops as K

torch.set_num_threads(1)

HEADS, KV_HEADS, HD, BLOCK = 4, 2, 8, 4
SCALE = HD ** -0.5


@pytest.fixture
def gen(request) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()) + 1)


def dequantized(x: torch.Tensor) -> torch.Tensor:
    values, scales = K.quantize_int8(x)
    return values.float() * scales.unsqueeze(-1)


# --- quantization ---------------------------------------------------------------------------


def test_quantize_is_symmetric_per_vector_with_half_step_error(gen):
    x = torch.randn(6, KV_HEADS, HD, generator=gen) * torch.tensor([0.01, 30.0]).view(1, 2, 1)
    values, scales = K.quantize_int8(x)
    assert values.dtype == torch.int8 and scales.dtype == torch.float32
    assert values.shape == x.shape and scales.shape == x.shape[:-1]
    torch.testing.assert_close(scales, x.abs().amax(-1) / 127)
    assert (values.abs().amax(-1) == 127).all()                   # each vector's largest entry maps to +-127
    error = (values.float() * scales.unsqueeze(-1) - x).abs()
    assert (error <= scales.unsqueeze(-1) / 2 + 1e-6).all()       # per-head scales: the small head keeps its precision


def test_zero_vectors_quantize_to_zero_not_nan():
    values, scales = K.quantize_int8(torch.zeros(3, KV_HEADS, HD))
    assert not values.any() and not scales.any()
    cache = K.QuantizedKV.zeros(4, KV_HEADS, HD)
    cache.write(torch.tensor([1]), torch.zeros(1, KV_HEADS, HD))
    assert torch.equal(cache[torch.arange(4)], torch.zeros(4, KV_HEADS, HD))


def test_allocate_int8_cache_gives_values_and_scales_per_layer():
    cache = K.allocate_kv_cache(3, 32, KV_HEADS, HD, torch.int8)
    assert len(cache) == 3
    for kc, vc in cache:
        for c in (kc, vc):
            assert isinstance(c, K.QuantizedKV)
            assert c.values.dtype == torch.int8 and c.values.shape == (32, KV_HEADS, HD) and not c.values.any()
            assert c.scales.dtype == torch.float32 and c.scales.shape == (32, KV_HEADS) and not c.scales.any()
    assert cache[0][0].values.data_ptr() != cache[1][0].values.data_ptr()


def test_quantized_cache_reads_back_dequantized_slots(gen):
    cache = K.QuantizedKV.zeros(10, KV_HEADS, HD)
    x = torch.randn(3, KV_HEADS, HD, generator=gen)
    slots = torch.tensor([7, 2, 5])
    cache.write(slots, x)
    torch.testing.assert_close(cache[slots], dequantized(x))
    assert cache[torch.tensor([[7, 2], [5, 0]])].shape == (2, 2, KV_HEADS, HD)   # gathered [B, S] contexts
    torch.testing.assert_close(cache[5:8][0], dequantized(x)[2])                  # slices, as a contiguous slab
    assert cache[0:1].abs().sum() == 0


# --- attention ------------------------------------------------------------------------------


def dense(q, keys, values, past):
    """New token j (position past + j) attends to keys[:past + j + 1], GQA; float64."""
    n = q.shape[0]
    q = q.double().view(n, HEADS, HD)
    out = torch.empty(n, HEADS, HD, dtype=torch.float64)
    group = HEADS // KV_HEADS
    for j in range(n):
        for h in range(HEADS):
            w = torch.softmax(keys[:past + j + 1, h // group].double() @ q[j, h] * SCALE, dim=0)
            out[j, h] = w @ values[:past + j + 1, h // group].double()
    return out.view(n, HEADS * HD)


def test_int8_attention_matches_dense_attention_over_dequantized_context(gen):
    """Two sequences: a whole prefill (attends to its exact K/V), a chunk over cached context
    beside a one-token sequence (a mixed step), then decode steps; everything read back from
    the cache is the dequantized K/V, exactly."""
    lengths = [14, 8]
    q = [torch.randn(n, HEADS * HD, generator=gen) for n in lengths]
    k = [torch.randn(n, KV_HEADS * HD, generator=gen) * 3 for n in lengths]
    v = [torch.randn(n, KV_HEADS * HD, generator=gen) for n in lengths]
    tables = [[5, 1, 7, 3], [2, 6]]
    cache_k, cache_v = K.allocate_kv_cache(1, 8 * BLOCK, KV_HEADS, HD, torch.int8)[0]
    float_k, float_v = K.allocate_kv_cache(1, 8 * BLOCK, KV_HEADS, HD)[0]
    done = [0, 0]

    def step(counts: dict[int, int], decode: bool = False):
        rows, slots, qs, ctx, expected = [], [], [0], [], []
        for s, n in counts.items():
            a, b = done[s], done[s] + n
            rows.append((s, a, b))
            slots += [tables[s][p // BLOCK] * BLOCK + p % BLOCK for p in range(a, b)]
            qs.append(qs[-1] + n)
            ctx.append(b)
            keys, vals = k[s][:b].view(b, KV_HEADS, HD), v[s][:b].view(b, KV_HEADS, HD)
            if a > 0 or n == 1:     # read back from the cache: every position dequantized
                keys, vals = dequantized(keys), dequantized(vals)
            expected.append(dense(q[s][a:b], keys, vals, a))
            done[s] = b
        t = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
        width = max(len(tables[s]) for s in counts)
        batch = StepBatch(tokens=t(slots), positions=t(slots), query_start=t(qs), context_lens=t(ctx),
                          block_tables=t([tables[s] + [0] * (width - len(tables[s])) for s in counts]),
                          slot_mapping=t(slots), is_decode=decode, query_lens_host=list(counts.values()),
                          context_lens_host=ctx)
        meta = K.attention_metadata(batch, BLOCK)
        qq, kk, vv = (torch.cat([x[s][a:b] for s, a, b in rows]) for x in (q, k, v))
        out = K.paged_attention_int8(qq, kk, vv, cache_k, cache_v, meta, HEADS, KV_HEADS, HD, SCALE)
        ref = K.paged_attention(qq, kk, vv, float_k, float_v, meta, HEADS, KV_HEADS, HD, SCALE)
        torch.testing.assert_close(out.double(), torch.cat(expected), rtol=1e-4, atol=1e-5)
        # the stored slots hold exactly the quantized new K/V
        new_k = kk.view(-1, KV_HEADS, HD)
        values, scales = K.quantize_int8(new_k)
        assert torch.equal(cache_k.values[batch.slot_mapping], values)
        torch.testing.assert_close(cache_k.scales[batch.slot_mapping], scales)
        return out, ref

    out, ref = step({0: 9, 1: 5})           # whole prefills: exact K/V, same as the float kernel
    torch.testing.assert_close(out, ref)
    out, ref = step({0: 4, 1: 1})           # chunk over cached context + a one-token sequence
    assert 0 < (out - ref).abs().max() < 0.1    # int8 context moves the result, a little
    step({0: 1, 1: 1}, decode=True)


def test_int8_attention_refuses_a_float_cache(gen):
    k_cache, v_cache = K.allocate_kv_cache(1, 8, KV_HEADS, HD)[0]
    x = torch.randn(1, KV_HEADS * HD, generator=gen)
    batch = StepBatch(torch.tensor([0]), torch.tensor([0]), torch.tensor([0, 1]), torch.tensor([1]),
                      torch.tensor([[0]]), torch.tensor([0]), is_decode=True)
    with pytest.raises(TypeError, match="QuantizedKV"):
        K.paged_attention_int8(torch.randn(1, HEADS * HD), x, x, k_cache, v_cache, K.attention_metadata(batch, BLOCK),
                               HEADS, KV_HEADS, HD, SCALE)


def test_bf16_activations_stay_bf16(gen):
    cache_k, cache_v = K.allocate_kv_cache(1, 8, KV_HEADS, HD, torch.int8)[0]
    batch = StepBatch(torch.tensor([0]), torch.tensor([0]), torch.tensor([0, 1]), torch.tensor([1]),
                      torch.tensor([[0, 1]]), torch.tensor([0]), is_decode=True)
    q = torch.randn(1, HEADS * HD, generator=gen).bfloat16()
    kv = torch.randn(1, KV_HEADS * HD, generator=gen).bfloat16()
    out = K.paged_attention_int8(q, kv, kv, cache_k, cache_v, K.attention_metadata(batch, BLOCK), HEADS, KV_HEADS, HD, SCALE)
    assert out.dtype == torch.bfloat16
    # one token attends only to itself: the output is its (dequantized) value vector, per head group
    expected = dequantized(kv.float().view(1, KV_HEADS, HD)).repeat_interleave(HEADS // KV_HEADS, dim=1)
    torch.testing.assert_close(out.float().view(1, HEADS, HD), expected, rtol=1e-2, atol=1e-2)


# --- a generated runner ---------------------------------------------------------------------

SPEC = """deployment kv_int8_runner {{
  model "{path}" {{ dtype = f32 }}
  target cpu {{ threads = 1, memory = 256 MiB }}
  workload {{ arrivals = closed(4), prompt_tokens = fixed(32), output_tokens = fixed(16) }}
  serve {{ max_context = 256 }}
}}
"""


def test_generated_runner_allocates_and_reads_an_int8_cache(tmp_path):
    model_dir = make_tiny(tmp_path / "tiny-llama", arch="llama")
    module = lower_spec(parse_spec_text(SPEC.format(path=model_dir), str(tmp_path / "t.vs")))
    logits = {}
    for pipeline in ("paged-kv{block=16}", "paged-kv{block=16},kv-int8"):
        plan = PassManager(pipeline).run(module)
        source = generate_runner_source(plan)
        runner = load_runner_class(source, f"kv_int8_runner_{len(logits)}")(str(model_dir))
        cache = runner.create_kv_cache(num_blocks=4)
        int8 = "kv-int8" in pipeline
        assert ("CACHE_DTYPE = torch.int8" in source) == int8 and ("paged_attention_int8(" in source) == int8
        assert runner.cache_config.dtype == (torch.int8 if int8 else torch.float32)
        assert isinstance(cache[0][0], K.QuantizedKV) == int8
        prompt = torch.randint(3, 2000, (20,), generator=torch.Generator().manual_seed(3))
        pos = torch.arange(20)
        table = torch.tensor([[2, 0]])
        slots = table[0, pos // 16] * 16 + pos % 16
        first = runner.prefill(StepBatch(prompt, pos, torch.tensor([0, 20]), torch.tensor([20]), table, slots,
                                         query_lens_host=[20], context_lens_host=[20]))
        p = torch.tensor([20])
        second = runner.decode(StepBatch(torch.tensor([5]), p, torch.tensor([0, 1]), p + 1, table,
                                         table[0, p // 16] * 16 + p % 16, is_decode=True,
                                         query_lens_host=[1], context_lens_host=[21]))
        logits[pipeline] = (first, second)
        if int8:
            assert cache[0][0].values[slots].any() and cache[0][0].scales[slots].all()
    (f_first, f_second), (q_first, q_second) = logits.values()
    torch.testing.assert_close(q_first, f_first)          # prefill attends to exact K/V
    gap = (q_second - f_second).abs().max().item()        # decode reads the int8 context
    assert 0 < gap < 0.05


def test_runtime_kernel_table_has_the_int8_kernel():
    from vsc.ir.kernels import KERNELS
    from vsc.runtime.kernels import TORCH_KERNELS
    assert TORCH_KERNELS["torch.paged_attention_int8"] is K.paged_attention_int8
    assert KERNELS["torch.paged_attention_int8"].cache_dtypes == {"i8"}
