"""Runtime mutants: a wrong prefix cache must never reach a server.

A prefix-cache bug changes no IR: the plan is fine, the engine serves it wrongly. So these
mutants patch the runtime (vsc.runtime, which the accuracy check's engine run uses) and
`vsc compile` must refuse the plan at the numeric check after prefix-cache, whose engine
run ("through the engine") sends requests sharing prefixes with earlier ones.

The model is the plain tiny llama. K/V taken from the wrong context moves its logits by a
few tenths, far past the 1e-3 tolerance, and the engine run compares the logits behind
every token (the engine's verification-only logits hook), not only the greedy tokens.
"""
from __future__ import annotations

import pytest
import torch

from vsc.driver import CompileError, compile_to_server
from vsc.errors import PassFailure
from vsc.frontend.lower import lower_spec
from vsc.frontend.parser import parse_spec_text
from vsc.ir.module import ServingModule
from vsc.models.tiny import make_tiny
from vsc.runtime.prefix_cache import RadixTree
from vsc.runtime.scheduler import Scheduler

torch.set_num_threads(1)

SPEC = """
deployment runtime_mutants {{
  model "{model}" {{ dtype = f32 }}
  target cpu {{ threads = 1, memory = 256 MiB }}
  workload {{ arrivals = closed(4), prompt_tokens = fixed(32), output_tokens = fixed(16) }}
  accuracy {{ greedy_exact(probes = 4) }}
  serve {{ max_context = 256 }}
}}
"""
PIPELINE = "paged-kv{block=16},continuous-batching{max_batch=16,max_tokens=512},prefix-cache{policy=radix}"


@pytest.fixture(scope="module")
def module(tmp_path_factory) -> ServingModule:
    root = tmp_path_factory.mktemp("runtime-mutants")
    model = make_tiny(root / "tiny-llama", arch="llama")
    return lower_spec(parse_spec_text(SPEC.format(model=model), root / "m.vs"))


def compile_error(module, tmp_path):
    with pytest.raises((PassFailure, CompileError)) as err:
        compile_to_server(module, PIPELINE, tmp_path / "server", None, reproducer_dir=tmp_path)
    assert not (tmp_path / "server").exists(), "a mutant plan must never be written"
    return err.value


def caught_by(err) -> str:
    """Which check refused the plan, as "<pass>: <check>": "engine" for the numeric check after
    the pass in its run through the engine, "numeric" for that check's direct runs, "invalid IR"
    for the structural verifier, "accuracy" for the check after lowering."""
    if isinstance(err, PassFailure):
        after = err.pass_name.split("{")[0]
        if err.message.startswith("changed the model's outputs"):
            return f"{after}: {'engine' if '(through the engine' in err.message else 'numeric'}"
        if err.message.startswith("produced invalid IR"):
            return f"{after}: invalid IR"
        return f"{after}: {err.message}"
    return "lowering: accuracy" if "accuracy check failed" in str(err) else f"{type(err).__name__}: {err}"


def test_the_correct_prefix_cache_compiles(module, tmp_path):
    """The control: on the same model the real prefix cache passes every check."""
    result = compile_to_server(module, PIPELINE, tmp_path / "server", None, reproducer_dir=tmp_path)
    assert "engine run exact" in result.accuracy_summary


def test_mutation_prefix_hit_on_a_different_prefix(module, tmp_path, monkeypatch):
    """A tree keyed on a block's own tokens, ignoring its parent: a block of the same tokens
    cached after another prefix (at other positions) is wrongly reused."""
    monkeypatch.setattr(RadixTree, "key", lambda self, parent, tokens: tokens)
    assert caught_by(compile_error(module, tmp_path)) == "prefix-cache: engine"


def test_mutation_prefix_hit_counts_one_token_too_many(module, tmp_path, monkeypatch):
    """A hit that claims one token past its cached blocks: that token's K/V is never written,
    and attention reads whatever the slot held before."""
    real = Scheduler._cached_prefix

    def one_too_many(self, seq):
        blocks, tokens = real(self, seq)
        return blocks, tokens + 1 if blocks else tokens

    monkeypatch.setattr(Scheduler, "_cached_prefix", one_too_many)
    assert caught_by(compile_error(module, tmp_path)) == "prefix-cache: engine"


CASCADE = PIPELINE + ",cascade-attention"      # the default threshold: 64 shared tokens


def test_the_correct_cascade_attention_compiles(module, tmp_path):
    result = compile_to_server(module, CASCADE, tmp_path / "server", None, reproducer_dir=tmp_path)
    assert "engine run exact" in result.accuracy_summary


def test_mutation_cascade_merges_with_the_wrong_weights(module, tmp_path, monkeypatch):
    """Cascade attention whose shared part is scaled wrong (a merge bug): the check lowers the
    plan's 64-token threshold to one token so that its short prefix-sharing probes take the
    cascade path at all (at 64 they never did, and this mutant compiled)."""
    import vsc.runtime.kernels.torch_ops as ops
    real = ops._softmax_parts
    calls = []

    def wrong(scores, values):
        out, m, total = real(scores, values)
        calls.append(scores.dim())
        return (out * 1.1, m, total) if scores.dim() == 3 else (out, m, total)   # 3-D: the shared prefix

    monkeypatch.setattr(ops, "_softmax_parts", wrong)
    with pytest.raises(PassFailure) as err:
        compile_to_server(module, CASCADE, tmp_path / "server", None, reproducer_dir=tmp_path)
    assert 3 in calls                                  # the mutant ran: a probe took the cascade path
    assert caught_by(err.value) == "cascade-attention: engine"
    assert not (tmp_path / "server").exists()
