"""GGUF block formats (vsc.runtime.quant): lossless planar layout, llama.cpp-exact quantizers."""
from __future__ import annotations

import gguf
import gguf.quants
import numpy as np
import pytest
import torch

from vsc.runtime import quant

FMTS = ["q8_0", "q4_0", "q4_1"]


def _weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 3
    w[0, :32] = 0.0  # an all-zero block
    if n > 1 and k >= 64:
        w[1, 32:64] = 7.25  # a constant block
    if n > 2:
        w[2, :32] *= 1e4  # a huge-scale block
        w[2, -32:] *= 1e-6  # a tiny-scale block
    return w


def _qtype(fmt: str):
    return gguf.GGMLQuantizationType[quant.FORMATS[fmt].ggml_type]


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("shape", [(1, 32), (37, 96), (8, 576)])
def test_quantize_matches_gguf_bytes(fmt, shape):
    w = _weights(*shape)
    ref = gguf.quants.quantize(w.numpy(), _qtype(fmt))
    parts = quant.quantize(w, fmt)
    assert tuple(parts) == quant.FORMATS[fmt].parts
    got = quant.to_gguf_blocks(parts, fmt)
    assert got.shape == ref.shape == (shape[0], quant.nbytes(shape, fmt) // shape[0])
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("fmt", FMTS)
def test_planar_layout(fmt):
    n, k = 5, 96
    parts = quant.quantize(_weights(n, k, 1), fmt)
    for name, (shape, dtype) in quant.part_shapes((n, k), fmt).items():
        assert parts[name].shape == shape and parts[name].dtype == dtype and parts[name].is_contiguous()
    assert quant.weight_shape(parts, fmt) == (n, k)


@pytest.mark.parametrize("fmt", FMTS)
def test_gguf_round_trip_is_lossless(fmt):
    f = quant.FORMATS[fmt]
    rng = np.random.default_rng(0)
    n, nb = 7, 5
    raw = rng.integers(0, 256, size=(n, nb * f.bytes_per_block), dtype=np.uint8)
    # keep the f16 scale fields finite so that dequantize comparisons below are meaningful
    blocks = raw.reshape(n, nb, f.bytes_per_block)
    for off in range(0, 2 * (len(f.parts) - 1), 2):
        blocks[:, :, off + 1] &= 0x3B
    parts = quant.from_gguf_blocks(raw, fmt)
    np.testing.assert_array_equal(quant.to_gguf_blocks(parts, fmt), raw)
    ref = gguf.quants.dequantize(raw, _qtype(fmt)).reshape(n, nb * 32)
    np.testing.assert_array_equal(quant.dequantize(parts, fmt).numpy(), ref)


@pytest.mark.parametrize("fmt", FMTS)
def test_dequantize_matches_gguf(fmt):
    w = _weights(33, 576, 2)
    raw = gguf.quants.quantize(w.numpy(), _qtype(fmt))
    parts = quant.from_gguf_blocks(raw, fmt)
    ref = gguf.quants.dequantize(raw, _qtype(fmt))
    np.testing.assert_array_equal(quant.dequantize(parts, fmt).numpy(), ref)
    err = (quant.dequantize(parts, fmt) - w).abs().max().item()
    assert err <= w.abs().max().item() / (100 if fmt == "q8_0" else 5)


def test_nibble_order():
    q = torch.arange(32, dtype=torch.int32) % 16  # element j -> j % 16
    w = (q.to(torch.float32) - 8).reshape(1, 32)
    w[0, 0] = -8.0
    parts = quant.quantize(w, "q4_0")
    qs = parts["qs"][0]
    assert int(qs[1]) == (1 | (1 << 4))  # byte 1: element 1 low, element 17 high
    assert torch.equal(quant.unpack(parts, "q4_0")[0], torch.tensor([0] + list(range(1, 16)) + list(range(16)),
                                                                    dtype=torch.int32))


def test_errors():
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.quantize(torch.zeros(4, 48), "q8_0")
    with pytest.raises(ValueError, match="unknown quantization format"):
        quant.quantize(torch.zeros(4, 64), "q5_0")
    with pytest.raises(ValueError, match="unknown quantization format"):
        quant.nbytes((4, 64), "f16")
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.nbytes((4, 33), "q4_0")
    with pytest.raises(ValueError, match="whole number"):
        quant.from_gguf_blocks(np.zeros((2, 35), np.uint8), "q8_0")
    assert quant.nbytes((576, 576), "q8_0") == 576 * 18 * 34
    assert quant.nbytes((576, 576), "q4_0") == 576 * 18 * 18
    assert quant.nbytes((576, 576), "q4_1") == 576 * 18 * 20
