"""Mutation test for speculative decoding: a wrong verification must never reach a server.

The speculative pass only changes the request graph; what could go wrong lives in the
runtime, so the check that must catch it is the accuracy check's run through the plan's own
engine (its probes include prompts on which the tiny model drafts; see
vsc.backends.torch.accuracy.engine_phases).
"""
from __future__ import annotations

import pytest

import vsc.runtime.speculative as speculative
from vsc.driver import compile_to_server
from vsc.errors import PassFailure
from vsc.frontend.lower import lower_spec
from vsc.frontend.parser import parse_spec_text
from vsc.models.tiny import make_tiny

SPEC = """
deployment mutants {{
  model "{model}" {{ dtype = f32 }}
  target cpu {{ threads = 1, memory = 256 MiB }}
  workload {{ arrivals = closed(4), prompt_tokens = fixed(32), output_tokens = fixed(16) }}
  accuracy {{ greedy_exact(probes = 4) }}
  serve {{ max_context = 256 }}
}}
"""
PIPELINE = "paged-kv{block=16},continuous-batching{max_batch=8,max_tokens=512},speculative{method=ngram,k=4}"


@pytest.fixture(scope="module")
def module(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec-mutants")
    model = make_tiny(root / "tiny-llama", arch="llama")
    return lower_spec(parse_spec_text(SPEC.format(model=model), root / "m.vs"))


def test_mutation_speculative_accepts_a_rejected_draft(module, tmp_path, monkeypatch):
    """Verification keeps one draft more than the model agreed with: the first rejected draft
    is emitted as if it were the model's token."""
    real = speculative.accepted_length

    def one_too_many(drafts, picks):
        return min(real(drafts, picks) + 1, len(drafts))

    monkeypatch.setattr(speculative, "accepted_length", one_too_many)
    with pytest.raises(PassFailure) as err:
        compile_to_server(module, PIPELINE, tmp_path / "server", None, reproducer_dir=tmp_path)
    assert not (tmp_path / "server").exists(), "a mutant plan must never be written"
    text = str(err.value)
    # caught right after the speculative pass, by the accuracy check's run through the engine
    assert "speculative{method=ngram,k=4}" in text and "changed the model's outputs" in text
    assert "(through the engine" in text and "diverged at position" in text
