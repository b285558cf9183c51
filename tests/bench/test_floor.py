"""The physical floor: parameter, byte and FLOP counts on known configs, and the bound they give."""
from __future__ import annotations

import json
import math

import pytest

from vsc.bench.floor import (MachineRates, ModelShape, decode_floor, format_floor, last_level_cache_bytes,
                             measure_bandwidth, measure_matmul)
from vsc.errors import ModelError
from vsc.ir.hf_import import build_model_graph

SMALL = {"model_type": "llama", "vocab_size": 256, "hidden_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64, "tie_word_embeddings": False}

# SmolLM2-135M's config.json (the numbers only)
SMOLLM2 = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536,
           "tie_word_embeddings": True}


def test_counts_on_a_small_config_by_hand():
    s = ModelShape.from_config(SMALL, "small")
    assert (s.head_dim, s.kv_heads, s.tied) == (8, 2, False)
    # attention: q 32*32 + k,v 2*32*16 + o 32*32 = 3072; MLP 3*32*64 = 6144
    assert s.attn_params == 3072 and s.mlp_params == 6144
    # embed + lm_head 2*256*32 + 2 layers * (3072 + 6144 + 2*32 norms) + final norm 32
    assert s.params == 16384 + 2 * 9280 + 32 == 34976
    assert s.weight_bytes == 4 * 34976
    assert s.matmul_params_per_token == 2 * 9216 + 8192 == 26624
    # decode B=4, C=100: 2*4*26624 + 4*4*100*2 layers*4 heads*8
    assert s.decode_flops(4, 100) == 212992 + 102400
    # bytes: weights read (2*(9216+64) + lm_head 8192 + norm 32 + 4 embedding rows of 32) * 4
    #        + KV 4 seqs * 101 positions * (2 layers * 2 (k,v) * 2 kv_heads * 8 * 4 bytes = 256)
    assert s.kv_bytes_per_token() == 256
    assert s.decode_bytes(4, 100) == (18560 + 8192 + 32 + 128) * 4 + 4 * 101 * 256
    # prefill of 10 tokens: 2*10*26624 + 4*2*4*8 * (10*11/2)
    assert s.prefill_flops(10) == 532480 + 256 * 55
    assert s.prefill_bytes(10) == s.weight_bytes + 10 * 256


def test_tied_embeddings_and_smollm2_parameter_count():
    tied = ModelShape.from_config(dict(SMALL, tie_word_embeddings=True))
    assert ModelShape.from_config(SMALL).params - tied.params == 256 * 32
    s = ModelShape.from_config(SMOLLM2, "smollm2-135m")
    assert s.params == 134_515_008                         # what HF reports for SmolLM2-135M
    assert s.matmul_params_per_token == s.params - 30 * 2 * 576 - 576   # tied: lm_head is the embedding


def test_qwen2_biases_and_mixtral_experts():
    q = ModelShape.from_config(dict(SMALL, model_type="qwen2"))
    assert q.attn_params - ModelShape.from_config(SMALL).attn_params == 32 + 2 * 16
    moe = ModelShape.from_config(dict(SMALL, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2))
    dense = ModelShape.from_config(SMALL)
    assert moe.params - dense.params == 2 * (3 * 6144 + 32 * 4)          # 3 more experts + router per layer
    assert moe.matmul_params_per_token - dense.matmul_params_per_token == 2 * (6144 + 128)
    # batch 1 reads the 2 active experts; batch 8 may touch all 4
    assert moe.decode_bytes(8, 0) - moe.decode_bytes(1, 0) >= 2 * 2 * 6144 * 4


def _ir_params(model_dir) -> int:
    """Parameters of the model graph `vsc compile` imports: each weight's elements, times the
    layers for a per-layer weight and the experts for a per-expert one."""
    graph = build_model_graph(model_dir)
    total = 0
    for w in graph.weights:
        n = math.prod(w.type.shape)
        n *= graph.attrs["layers"] if "{i}" in w.name else 1
        n *= graph.attrs.get("experts", 1) if "{e}" in w.name else 1
        total += n
    return total


@pytest.mark.parametrize("cfg", [
    SMALL,
    dict(SMALL, tie_word_embeddings=True),
    dict(SMALL, attention_bias=True),
    dict(SMALL, model_type="qwen2"),
    dict(SMALL, model_type="qwen2", attention_bias=False),   # Qwen2 has q/k/v biases whatever the config says
    dict(SMALL, model_type="mistral", head_dim=16),
    dict(SMALL, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
], ids=["llama", "tied", "llama-bias", "qwen2", "qwen2-bias-false", "mistral-head-dim", "mixtral"])
def test_floor_counts_the_weights_the_importer_builds(tmp_path, cfg):
    """The floor and the importer read config.json the same way: the floor's parameter count is
    the IR model graph's, and `from_model_dir` gives the same shape as `from_config`."""
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = ModelShape.from_model_dir(tmp_path)
    assert shape == ModelShape.from_config(cfg, tmp_path.name)
    assert shape.params == _ir_params(tmp_path)
    graph = build_model_graph(tmp_path)
    assert shape.attention_bias == graph.attrs["attention_bias"]
    assert (shape.experts, shape.experts_per_token) == (graph.attrs.get("experts", 0),
                                                       graph.attrs.get("experts_per_token", 1))


def test_unsupported_or_incomplete_configs_are_refused():
    with pytest.raises(ModelError, match="unsupported model_type 'gpt2'"):
        ModelShape.from_config(dict(SMALL, model_type="gpt2"), "m")
    with pytest.raises(ModelError, match="config lacks 'intermediate_size'"):
        ModelShape.from_config({k: v for k, v in SMALL.items() if k != "intermediate_size"}, "m")


RATES = MachineRates(bandwidth_gbs=20.0, bandwidth_1t_gbs=10.0, cache_bandwidth_gbs=100.0, llc_bytes=1 << 20,
                     gflops_1t=50.0, gflops_all=80.0, threads=2)


def test_floor_is_the_larger_of_memory_and_compute_time():
    s = ModelShape.from_config(SMOLLM2, "smollm2-135m")
    f1 = decode_floor(s, RATES, batch=1, context=512)
    assert f1.bandwidth_kind == "dram" and f1.bandwidth_gbs == 20.0 and f1.gflops == 80.0
    assert f1.t_memory_s == pytest.approx(s.decode_bytes(1, 512) / 20e9)
    assert f1.t_compute_s == pytest.approx(s.decode_flops(1, 512) / 80e9)
    assert f1.bound == "memory" and f1.t_step_s == f1.t_memory_s
    assert f1.tok_per_s == pytest.approx(1 / f1.t_step_s) and f1.ms_per_step == pytest.approx(1000 * f1.t_step_s)
    f64 = decode_floor(s, RATES, batch=64, context=512)
    assert f64.bound == "compute" and f64.t_step_s == f64.t_compute_s
    assert f64.tok_per_s == pytest.approx(64 / f64.t_step_s) and f64.tok_per_s > f1.tok_per_s
    one = decode_floor(s, RATES, batch=1, context=512, threads="1")
    assert one.gflops == 50.0 and one.bandwidth_gbs == 10.0
    pf = s.prefill_flops(512) / 80e9
    assert f1.prefill_s_per_token == pytest.approx(max(pf, s.prefill_bytes(512) / 20e9) / 512)


def test_small_models_use_the_cache_bandwidth():
    f = decode_floor(ModelShape.from_config(SMALL), RATES, batch=1, context=16)
    assert f.step_bytes <= RATES.llc_bytes // 2
    assert f.bandwidth_kind == "cache" and f.bandwidth_gbs == 100.0


def test_all_threads_is_never_slower_than_one():
    slow_all = MachineRates(5.0, 10.0, 10.0, 0, 60.0, 40.0, 2)
    f = decode_floor(ModelShape.from_config(SMOLLM2), slow_all, batch=1)
    assert f.bandwidth_gbs == 10.0 and f.gflops == 60.0


def test_measurements_are_positive_and_finite():
    bw = measure_bandwidth(1 << 20, threads=1, repeats=2)
    gf = measure_matmul(128, threads=1, repeats=2)
    assert 0.1 < bw < 10_000 and math.isfinite(bw)
    assert 0.01 < gf < 100_000


def test_last_level_cache_is_the_highest_level_in_sysfs(tmp_path):
    def cache(index: str, level: str, size: str):
        (tmp_path / index).mkdir()
        (tmp_path / index / "level").write_text(level + "\n")
        (tmp_path / index / "size").write_text(size + "\n")

    assert last_level_cache_bytes(tmp_path) == 0                      # no caches listed: unknown
    cache("index0", "1", "48K")                                        # L1d
    cache("index1", "1", "32K")                                        # L1i
    cache("index2", "2", "2048K")
    assert last_level_cache_bytes(tmp_path) == 2048 << 10
    cache("index3", "3", "30M")
    cache("index4", "x", "99M")                                        # unreadable level: skipped
    cache("index5", "3", "junk")                                       # unreadable size: skipped
    assert last_level_cache_bytes(tmp_path) == 30 << 20


def test_format_floor_lines():
    s = ModelShape.from_config(SMOLLM2, "smollm2-135m")
    text = format_floor(RATES, [decode_floor(s, RATES, 1), decode_floor(s, RATES, 16)])
    lines = text.splitlines()
    assert len(lines) == 4 and lines[0].startswith("machine: DRAM read 20.0 GB/s")
    assert "floor smollm2-135m batch 16 ctx 512" in lines[3] and "memory-bound" in lines[2]
    assert "weights 538.06 MB" in lines[2]
