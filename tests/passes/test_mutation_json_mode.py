"""Runtime mutants of json-mode, caught when `vsc compile` runs the numeric check.

json-mode changes outputs by design, so the compile's numeric check holds a json-mode plan
to the grammar-masked reference (vsc.backends.torch.constrained_check) as well as the usual
unconstrained one. A mutant engine that forgets the mask must never produce a server.
"""
from __future__ import annotations

import json

import pytest

from vsc.driver import CompileError, compile_to_server
from vsc.errors import PassFailure
from vsc.frontend.lower import lower_spec
from vsc.frontend.parser import parse_spec_text
from vsc.models.tiny import make_tiny

SPEC = """
deployment json_mutants {{
  model "{model}" {{ dtype = f32 }}
  target cpu {{ threads = 1, memory = 256 MiB }}
  workload {{ arrivals = closed(4), prompt_tokens = fixed(32), output_tokens = fixed(16) }}
  accuracy {{ greedy_exact(probes = 2) }}
  serve {{ max_context = 256 }}
}}
"""
PIPELINE = "paged-kv{block=16},continuous-batching{max_batch=8,max_tokens=512},json-mode{schema=person.json}"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def spec_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("json-mutants")
    model = make_tiny(root / "tiny-llama", arch="llama")
    (root / "person.json").write_text(json.dumps(PERSON))
    (root / "m.vs").write_text(SPEC.format(model=model))
    return root


def module_of(spec_dir):
    path = spec_dir / "m.vs"
    return lower_spec(parse_spec_text(path.read_text(), path))


def test_a_json_mode_plan_compiles_and_records_its_constrained_check(spec_dir, tmp_path):
    result = compile_to_server(module_of(spec_dir), PIPELINE, tmp_path / "server", spec_dir / "m.vs")
    manifest = json.loads((tmp_path / "server" / "manifest.json").read_text())
    final = manifest["verification"][-1]
    assert final["ok"] and "json-mode: 2 constrained probes match the grammar-masked reference" in final["summary"]
    assert final["constrained"]["ok"] is True
    assert "json-mode" in result.accuracy_summary


def test_mutant_engine_that_skips_the_grammar_mask_is_caught_by_the_constrained_check(spec_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("vsc.runtime.engine.apply_constraints", lambda logits, constraints: logits)
    with pytest.raises((PassFailure, CompileError)) as err:     # the check after json-mode refuses it
        compile_to_server(module_of(spec_dir), PIPELINE, tmp_path / "server", spec_dir / "m.vs",
                          reproducer_dir=tmp_path)
    assert "json-mode probe" in str(err.value)
    assert not (tmp_path / "server").exists()
