"""Mutation suite: deliberately wrong rewrites must never reach a server.

Each mutant is a pass that claims to be exact (as a buggy fusion would) but rewrites the IR
wrongly. `vsc compile` must refuse every one, and each test names the check that caught it:
the structural verifier after the pass (PassFailure naming an invariant), or the accuracy
check after lowering (CompileError naming the probe and position that diverged).
"""
from __future__ import annotations

import re

import pytest

from vsc.driver import CompileError, compile_to_server
from vsc.errors import PassFailure
from vsc.frontend.lower import lower_spec
from vsc.frontend.parser import parse_spec_text
from vsc.ir.module import ServingModule, walk_ops
from vsc.ir.types import pass_origin
from vsc.models.tiny import make_tiny
from vsc.passes.base import PASSES, Pass
from ir_queries import layer_region

SPEC = """
deployment mutants {{
  model "{model}" {{ dtype = f32 }}
  target cpu {{ threads = 1, memory = 256 MiB }}
  workload {{ arrivals = closed(4), prompt_tokens = fixed(32), output_tokens = fixed(16) }}
  accuracy {{ greedy_exact(probes = 4) }}
  serve {{ max_context = 256 }}
}}
"""


@pytest.fixture(scope="module")
def module(tmp_path_factory) -> ServingModule:
    root = tmp_path_factory.mktemp("mutants")
    model = make_tiny(root / "tiny-llama", arch="llama")
    path = root / "m.vs"
    return lower_spec(parse_spec_text(SPEC.format(model=model), path))


def ops_of(m: ServingModule, kind: str):
    return [op for op in walk_ops(m.model.func.body) if op.kind == kind]


def compile_mutant(module, tmp_path, pipeline_before: str, apply):
    """Compile `module` with `pipeline_before` then a mutant pass doing `apply(module)`; return the error."""
    class Mutant(Pass):
        name = "test-mutant"

        def apply(self, m):
            apply(m)
            for op in walk_ops(m.model.func.body):
                op.origin = op.origin if op.origin.kind != "pass" else pass_origin(self.name)

    PASSES["test-mutant"] = Mutant
    try:
        pipeline = ",".join(p for p in (pipeline_before, "test-mutant") if p)
        with pytest.raises((PassFailure, CompileError)) as err:
            compile_to_server(module, pipeline, tmp_path / "server", None, reproducer_dir=tmp_path)
        assert not (tmp_path / "server").exists(), "a mutant plan must never be written"
        return err.value
    finally:
        PASSES.pop("test-mutant")


def caught_by(err) -> str:
    """The check that refused the plan, as the error names it: the invariants the structural
    verifier reported after the pass (their groups, "types", "cache", ...; sorted, comma-joined), or
    "accuracy" for the check after lowering (naming the probe and position that diverged)."""
    if isinstance(err, PassFailure) and err.message.startswith("produced invalid IR: "):
        # diagnostics name "[group.rule]": the group is the invariant
        return ",".join(sorted(set(re.findall(r"\[([\w-]+)(?:\.[\w.-]+)?\] ", err.message))))
    text = str(err)
    # a different greedy token ("diverged at position") or logits beyond the tolerance
    if isinstance(err, CompileError) and "accuracy check failed" in text and re.search(r"probe \d+.*position \d+", text):
        return "accuracy"
    return f"neither check: {type(err).__name__}: {text}"


def test_mutation_rope_wrong_offset(module, tmp_path):
    """RoPE applied with the wrong base (theta): positions rotate at the wrong rate."""
    def mutate(m):
        for op in ops_of(m, "rope"):
            op.attrs["theta"] = op.attrs["theta"] * 0.5
    assert caught_by(compile_mutant(module, tmp_path, "", mutate)) == "accuracy"


def test_mutation_wrong_softmax_scale(module, tmp_path):
    def mutate(m):
        for op in ops_of(m, "attention"):
            op.attrs["scale"] = op.attrs["scale"] * 2
    assert caught_by(compile_mutant(module, tmp_path, "", mutate)) == "accuracy"


def test_mutation_fused_qkv_split_in_wrong_order(module, tmp_path):
    """The fused projection is split as (k, q, v) sizes while the weights were concatenated (q, k, v)."""
    def mutate(m):
        (split,) = [op for op in ops_of(m, "split") if op.results[0] == "%q"]
        q, k, v = split.attrs["sizes"]
        split.attrs["sizes"] = [k, q, v]
    assert caught_by(compile_mutant(module, tmp_path, "fuse-qkv", mutate)) == "types"


def test_mutation_fused_qkv_k_and_v_swapped(module, tmp_path):
    """Same sizes, so the types agree: concatenating (q, v, k) but splitting as (q, k, v) changes the numbers."""
    def mutate(m):
        fused = next(w for w in m.model.weights if w.init_fn == "concat" and "qkv" in w.name)
        q, k, v = fused.init_args
        fused.init_args = [q, v, k]
    assert caught_by(compile_mutant(module, tmp_path, "fuse-qkv", mutate)) == "accuracy"


def test_mutation_gate_and_up_swapped(module, tmp_path):
    def mutate(m):
        fused = next(w for w in m.model.weights if w.init_fn == "concat" and "gate_up" in w.name)
        fused.init_args.reverse()
    assert caught_by(compile_mutant(module, tmp_path, "fuse-gate-up", mutate)) == "accuracy"


def test_mutation_add_rmsnorm_results_swapped(module, tmp_path):
    """The fused op's two results (norm, residual sum) bound the wrong way round."""
    def mutate(m):
        for op in ops_of(m, "add_rmsnorm"):
            op.results.reverse()
    assert caught_by(compile_mutant(module, tmp_path, "fuse-add-rmsnorm", mutate)) == "accuracy"


def test_mutation_dropped_residual(module, tmp_path):
    """The MLP residual add is replaced by its MLP branch alone (types still agree)."""
    def mutate(m):
        region = layer_region(m)
        last = region.ops[-1]
        assert last.kind == "add"
        last.operands = [last.operands[1], last.operands[1]]
    assert caught_by(compile_mutant(module, tmp_path, "", mutate)) == "accuracy"


def test_mutation_kv_block_off_by_one(module, tmp_path):
    """A paged cache whose capacity is one token short of whole blocks."""
    def mutate(m):
        m.cache.capacity_tokens -= 1
    assert caught_by(compile_mutant(module, tmp_path, "paged-kv{block=16}", mutate)) == "cache"


def test_mutation_cache_over_budget(module, tmp_path):
    def mutate(m):
        m.cache.capacity_tokens = (m.cache.budget_bytes // 1024 + 1) * 16
    assert caught_by(compile_mutant(module, tmp_path, "paged-kv{block=16}", mutate)) == "cache"


def test_mutation_step_budget_below_a_prompt(module, tmp_path):
    """Continuous batching with a step budget that cannot prefill a max_context prompt unchunked."""
    def mutate(m):
        m.batching.max_tokens = 64
    assert caught_by(compile_mutant(module, tmp_path, "paged-kv{block=16},continuous-batching", mutate)) == "batching"


def test_mutation_layer_count(module, tmp_path):
    """A rewrite that drops a layer from the repeat region."""
    def mutate(m):
        for op in ops_of(m, "repeat"):
            op.attrs["count"] -= 1
    assert caught_by(compile_mutant(module, tmp_path, "", mutate)) == "model"
