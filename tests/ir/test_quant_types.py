"""Block-quantized weight types in the IR: sizes, typing, the kernels check, the q/k row order."""
from __future__ import annotations

import torch

from vsc.ir.module import KernelRef, Weight
from vsc.ir.parser import parse_module
from vsc.ir.printer import print_module
from vsc.ir.types import Origin, TensorType
from vsc.ir.verifier import verify
from vsc.runtime.quant_tensor import QuantTensor, unpermute_rope_rows


def _quantize_head(module, dtype: str, kernel: str):
    """Point the LM head at a `quantize` of its weight, in `dtype`, run by `kernel`."""
    model = module.model
    head = model.func.body[-2]
    assert head.kind == "linear"
    src = model.weight(head.operands[1])
    name = src.name.replace(".weight", f"_{dtype}.weight")
    model.weights.append(Weight(name, TensorType(dtype, src.type.shape), "quantize", [src.name], {"format": dtype},
                                Origin("pass", "test")))
    head.operands = [head.operands[0], name]
    head.kernel = KernelRef(kernel)
    return head


def test_quantized_sizes():
    assert TensorType("q4_1", (576, 1536)).nbytes() == 576 * 48 * 20
    assert TensorType("q8_0", (49152, 576)).nbytes() == 49152 * 18 * 34
    assert TensorType("q4_0", (32, 64)).nbytes() == 32 * 2 * 18


def test_a_quantized_weight_needs_a_kernel_that_reads_it(make_module):
    module = make_module("llama", hidden_size=64, intermediate_size=128)
    _quantize_head(module, "q4_1", "torch.linear")
    diags = [d for d in verify(module) if d.check == "kernels"]
    assert len(diags) == 1
    assert "kernel torch.linear does not read q4_1 weights" in diags[0].message
    assert "torch.linear_quant" in diags[0].message and "tvm.quant_linear" in diags[0].message


def test_quantized_plan_is_valid_and_round_trips(make_module):
    module = make_module("llama", hidden_size=64, intermediate_size=128)
    _quantize_head(module, "q8_0", "tvm.quant_linear")
    assert verify(module) == []
    text = print_module(module)
    assert "q8_0[" in text and "= quantize(@" in text
    assert print_module(parse_module(text, "x.vsir")) == text


def test_quantize_declared_type_must_match_its_format(make_module):
    module = make_module("llama", hidden_size=64, intermediate_size=128)
    _quantize_head(module, "q8_0", "tvm.quant_linear")
    module.model.weights[-1].init_attrs = {"format": "q4_0"}
    assert any("quantize()" in d.message for d in verify(module) if d.check == "weights")


def test_unpermute_undoes_llama_cpp_rope_permutation():
    heads, head_dim, cols = 3, 8, 64
    w = torch.randn(heads * head_dim, cols)
    # llama.cpp's converter: reshape(heads, 2, rows/heads/2, ...).swapaxes(1, 2)
    stored = w.reshape(heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(heads * head_dim, cols)
    index = unpermute_rope_rows(heads * head_dim, heads)
    assert torch.equal(stored.index_select(0, index), w)
    q = QuantTensor.quantize(stored, "q4_1").rows(index)       # the same on quantized rows
    assert torch.equal(q.dequantize(), QuantTensor.quantize(w, "q4_1").dequantize())
