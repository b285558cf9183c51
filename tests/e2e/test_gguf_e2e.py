"""GGUF weights served as shipped, and quantize-weights on a float model: compile, verify, serve."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from live_server import Live

from vsc.cli import main as vsc_main
from vsc.models import registry
from vsc.models.tiny import make_tiny
from vsc.runtime.quant_tensor import QuantTensor

SPEC = """
deployment gguf_e2e {{
  model "{model}"
  target cpu {{ threads = 1, memory = {memory} }}
  workload {{
    arrivals = closed(4)
    prompt_tokens = uniform(8, 64)
    output_tokens = fixed(16)
  }}
  accuracy {{ {accuracy} }}
  serve {{ max_context = 512 }}
  optimize "{pipeline}"
}}
"""
PIPELINE = "fuse-qkv,fuse-gate-up,paged-kv{block=16},continuous-batching{max_batch=4,max_tokens=512}"


def _compile(tmp_path: Path, model: Path, pipeline: str, accuracy: str, memory: str = "1 GiB") -> Path:
    spec = tmp_path / "deploy.vs"
    spec.write_text(SPEC.format(model=model, pipeline=pipeline, accuracy=accuracy, memory=memory))
    out = tmp_path / "server"
    assert vsc_main(["compile", str(spec), "-o", str(out)]) == 0
    return out


def test_smollm2_gguf_is_served_as_shipped(smollm2_dir, tmp_path):
    gguf_file = Path(smollm2_dir) / registry.MODELS["smollm2-135m"].gguf_name
    assert gguf_file.is_file(), "vsc models get keeps the GGUF beside the HF files"
    folder = _compile(tmp_path, gguf_file, "fold-rope-tables," + PIPELINE + ",select-kernels,compile-decode-step",
                      "greedy_exact(probes = 2)")
    plan = (folder / "plan.vsir").read_text()
    assert 'graph = "relax"' in plan and "via tvm.paged_attention" in plan     # one VM call per decode step
    assert "q4_1[" in plan and "q8_0[49152, 576]" in plan          # the file's formats, as IR types
    assert "via tvm.quant_linear" in plan and "via torch.linear_quant" not in plan
    assert "activations" not in plan          # greedy_exact: the exact kernels (fp32 activations)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert list(manifest["model"]["files"]) == [gguf_file.name]
    (kernel_file,) = manifest["tvm_kernels"]["files"]
    (step_file,) = manifest["decode_step"]["files"]
    assert (folder / "kernels" / kernel_file).is_file() and (folder / "kernels" / step_file).is_file()
    assert (folder / "tokenizer" / "tokenizer.json").is_file()
    accuracy = [v for v in manifest["verification"] if v["check"] == "accuracy" and v["after"] == "lowering"]
    assert accuracy and accuracy[0]["ok"] is True

    server = Live(folder)
    try:
        runner = server.engine.runner
        quantized = [w for layer in runner.layers for w in layer if isinstance(w, QuantTensor)]
        floats = [w for layer in runner.layers for w in layer if isinstance(w, torch.Tensor) and w.dim() == 2]
        assert quantized and not floats          # no dequantized copy of a layer weight is held
        r = server.client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16, temperature=0)
        assert "Paris" in r.choices[0].message.content
    finally:
        server.close()


def test_quantize_weights_pass_on_a_float_model(tmp_path):
    model = tmp_path / "tiny-llama"
    make_tiny(model, arch="llama")
    folder = _compile(tmp_path, model, PIPELINE + ",quantize-weights{format=q8_0,include_head=true},select-kernels",
                      "logits_tol(0.5, probes = 2)", memory="256 MiB")
    plan = (folder / "plan.vsir").read_text()
    # a logits tolerance lets select-kernels quantize the activations too (VNNI dot products)
    assert "= quantize(@" in plan and 'via tvm.quant_linear{activations = "q8_0"}' in plan
    manifest = json.loads((folder / "manifest.json").read_text())
    after = [v for v in manifest["verification"] if v["check"] == "accuracy"]
    assert [v["after"].split("{")[0] for v in after] == ["quantize-weights", "select-kernels", "lowering"]
    assert all(v["ok"] for v in after)
    server = Live(folder)
    try:
        r = server.client.completions.create(model=server.model, prompt="hello", max_tokens=8, temperature=0)
        assert r.usage.completion_tokens == 8
    finally:
        server.close()
