"""json mode in the real engine: a generated runner of the tiny model, constrained and free rows mixed.

The tiny model's weights are random, so its JSON is junk — but grammar-valid junk: every
finished output parses and matches the schema, and an output cut by max_tokens is a
prefix the grammar accepts.
"""
from __future__ import annotations

import asyncio
import json

import pytest
import torch

from vsc.backends.server.emit import engine_config, json_mode_config
from vsc.backends.torch.codegen import generate_runner_source, load_runner_class
from vsc.backends.torch.constrained_check import check_constrained, constrained_report
from vsc.frontend.lower import lower_spec
from vsc.frontend.parser import parse_spec_text
from vsc.models.tiny import EOS_ID, make_tiny
from vsc.passes.manager import PassManager
from vsc.runtime.api import EngineConfig, GenerateRequest, InvalidRequest, SamplingParams
from vsc.runtime.constrain import GrammarFailure, SchemaError, canonical_schema, make_constraint
from vsc.runtime.engine import LLMEngine
from vsc.runtime.tokenizer import Tokenizer

torch.set_num_threads(1)

SPEC = """deployment json_test {{
  model "{path}" {{ dtype = f32 }}
  target cpu {{ threads = 1, memory = 1 GiB }}
  workload {{ arrivals = closed(4), prompt_tokens = fixed(32), output_tokens = fixed(16) }}
  accuracy {{ greedy_exact(probes = 4) }}
  serve {{ max_context = 512 }}
}}
"""
PIPELINE = "paged-kv{block=16},continuous-batching{max_batch=8,max_tokens=512}"
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}
SMALL = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                          "age": {"type": "integer", "minimum": 0, "maximum": 120}},
         "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("json-engine") / "tiny-llama", arch="llama")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return Tokenizer.from_model_dir(model_dir)


def build(model_dir, pipeline: str):
    module = lower_spec(parse_spec_text(SPEC.format(path=model_dir), str(model_dir.parent / "test.vs")))
    return PassManager(pipeline).run(module)


@pytest.fixture(scope="module")
def module(model_dir):
    return build(model_dir, PIPELINE)


_count = iter(range(10**6))


def runner_of(module):
    return load_runner_class(generate_runner_source(module), f"json_runner_{next(_count)}")(module.model.attrs["path"])


@pytest.fixture(scope="module")
def runner(module):
    return runner_of(module)


def run(runner, tokenizer, module, requests, **config):
    engine = LLMEngine(runner, tokenizer, EngineConfig(**{**engine_config(module), **config}), "tiny")

    async def one(r):
        tokens, reason = [], None
        async for ev in engine.generate(r):
            tokens += ev.token_ids
            reason = ev.finish_reason
        return tokens, reason

    async def main():
        return await asyncio.gather(*(one(r) for r in requests))

    engine.start()
    try:
        return asyncio.run(main())
    finally:
        engine.shutdown()


def request(rid, tokenizer, text, schema=None, max_tokens=64, **params):
    ids = tokenizer.encode(text)
    return GenerateRequest(rid, ids, SamplingParams(max_tokens=max_tokens, json_schema=None if schema is None
                                                    else canonical_schema(schema), **params))


def assert_valid(tokens, reason, schema, tokenizer, vocab):
    """Finished: the text is JSON the schema accepts; cut by the limit: a prefix the grammar accepts."""
    body = [t for t in tokens if t != EOS_ID]
    c = make_constraint(tokenizer, vocab, schema)
    for t in body[:-1]:
        assert c.advance(t) is None, tokenizer.decode(body)
    last = c.advance(body[-1])
    if reason == "length":
        assert last is None or c.is_complete
        return None
    assert reason == "stop" and c.is_complete, (reason, tokenizer.decode(body))
    value = json.loads(tokenizer.decode(tokens))
    assert isinstance(value, dict) and {"name", "age"} <= set(value)
    assert isinstance(value["name"], str) and type(value["age"]) is int
    return value


def test_constrained_and_free_rows_share_a_batch(runner, tokenizer, module):
    free_alone = run(runner, tokenizer, module, [request("free", tokenizer, "Once upon a time", max_tokens=24,
                                                         temperature=0.0)])
    reqs = [
        request("person", tokenizer, "Extract the person: Ada Lovelace, 36.", PERSON, temperature=0.0),
        request("free", tokenizer, "Once upon a time", max_tokens=24, temperature=0.0),
        request("small-greedy", tokenizer, "Who is it? Alan, 41.", SMALL, temperature=0.0),
        request("small-sampled", tokenizer, "Who is it? Grace, 85.", SMALL, temperature=1.0, top_p=0.9, seed=7),
        request("person-sampled", tokenizer, "A person, as JSON:", PERSON, temperature=0.8, seed=3),
    ]
    out = dict(zip([r.request_id for r in reqs], run(runner, tokenizer, module, reqs)))
    assert out["free"] == free_alone[0]                  # the masks never touch an unconstrained row
    vocab = runner.vocab_size
    for rid, schema in (("person", PERSON), ("person-sampled", PERSON)):
        assert_valid(*out[rid], schema, tokenizer, vocab)
    for rid in ("small-greedy", "small-sampled"):
        tokens, reason = out[rid]
        assert reason == "stop", (rid, tokenizer.decode(tokens))    # bounded fields: it must finish
        value = assert_valid(tokens, reason, SMALL, tokenizer, vocab)
        assert set(value) == {"name", "age"} and len(value["name"]) <= 12 and 0 <= value["age"] <= 120


def test_the_deployment_schema_applies_unless_the_request_brings_its_own(runner, tokenizer, module):
    deployment = canonical_schema(SMALL)
    other = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
             "additionalProperties": False}
    (plain, plain_reason), (own, own_reason) = run(
        runner, tokenizer, module,
        [request("plain", tokenizer, "Hello", temperature=0.0), request("own", tokenizer, "Hello", other, temperature=0.0)],
        json_schema=deployment)
    assert plain_reason == "stop" and set(json.loads(tokenizer.decode(plain))) == {"name", "age"}
    assert own_reason == "stop" and set(json.loads(tokenizer.decode(own))) == {"ok"}


def test_a_bad_request_schema_is_rejected_before_any_event(runner, tokenizer, module):
    engine = LLMEngine(runner, tokenizer, EngineConfig(**engine_config(module)), "tiny")

    async def main():
        gen = engine.generate(GenerateRequest("bad", [5, 6, 7], SamplingParams(json_schema='{"type":"objekt"}')))
        with pytest.raises(InvalidRequest, match="invalid JSON Schema: Invalid type: objekt"):
            await gen.__anext__()

    engine.start()
    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_json_mode_plan_passes_its_numeric_check(model_dir, tmp_path):
    schema = tmp_path / "small.json"
    schema.write_text(json.dumps(SMALL))
    plan = build(model_dir, f"{PIPELINE},json-mode{{schema={schema}}}")
    assert json_mode_config(plan) == {"json_schema": canonical_schema(SMALL)}
    report = constrained_report(plan, runner_of(plan), probes=3, max_new_tokens=40)
    assert report.ok, report.summary()
    assert all(p.finish_reason == "stop" for p in report.probes)      # bounded schema: every probe completes
    assert report.summary().startswith("3 constrained probes match the grammar-masked reference")
    json.dumps(report.to_json())


def test_the_numeric_check_catches_an_engine_that_does_not_mask(model_dir, module, monkeypatch):
    plan = build(model_dir, f"{PIPELINE},json-mode")
    monkeypatch.setattr("vsc.runtime.engine.apply_constraints", lambda logits, constraints: logits)
    reason = check_constrained(plan, runner_of(plan), probes=2, max_new_tokens=8)
    assert reason is not None and reason.startswith("json-mode probe 0: token ")
    assert "is not allowed by the grammar" in reason or "broke the grammar" in reason


def test_the_numeric_check_catches_a_mask_on_the_wrong_row(model_dir, monkeypatch):
    import vsc.runtime.engine as engine_mod
    real = engine_mod.apply_constraints
    plan = build(model_dir, f"{PIPELINE},json-mode")
    # rotate the constraints by one row: each row gets its neighbour's mask
    monkeypatch.setattr(engine_mod, "apply_constraints", lambda logits, cs: real(logits, list(cs[1:]) + list(cs[:1])))
    reason = check_constrained(plan, runner_of(plan), probes=3, max_new_tokens=12)
    assert reason is not None and reason.startswith("json-mode probe ")


def test_plans_without_json_mode_have_nothing_to_check(module, runner):
    assert check_constrained(module, runner) is None


def test_jump_forward_gives_token_by_token_outputs_in_fewer_steps(runner, tokenizer, module):
    """Grammar-forced tokens (keys, punctuation) join a step as verified drafts: the same tokens as
    constrained decoding one token per step — greedy and seeded sampling, over the bench's json
    schemas and these — with fewer steps."""
    from vsc.bench.workloads import JSON_SCHEMAS

    schemas = [PERSON, SMALL, *JSON_SCHEMAS.values()]
    reqs = [request(f"g{i}", tokenizer, f"Describe item {i} as JSON:", s, max_tokens=48, temperature=0.0)
            for i, s in enumerate(schemas)]
    reqs += [request(f"s{i}", tokenizer, f"Item {i}:", s, max_tokens=48, temperature=0.9, seed=11 + i)
             for i, s in enumerate(schemas)]
    reqs.append(request("free", tokenizer, "Once upon a time", max_tokens=24, temperature=0.0))

    def steps_and_outputs(jump_forward):
        engine = LLMEngine(runner, tokenizer, EngineConfig(**{**engine_config(module), "jump_forward": jump_forward}),
                           "tiny")

        async def one(r):
            tokens = []
            async for ev in engine.generate(r):
                tokens += ev.token_ids
            return tokens

        async def main():
            return await asyncio.gather(*(one(r) for r in reqs))

        engine.start()
        try:
            return asyncio.run(main()), engine.stats()
        finally:
            engine.shutdown()

    plain, plain_stats = steps_and_outputs(False)
    jumped, stats = steps_and_outputs(True)
    assert jumped == plain
    assert plain_stats["jump_forward_tokens"] == 0 and stats["jump_forward_tokens"] > 2 * len(schemas)
    assert stats["steps"] < plain_stats["steps"]
    assert stats["kv_blocks_used"] == 0


# --- hostile schemas (issue 15, item 8)

#: Fine until the model has chosen the boolean; after it, llguidance's grammar forces an endless
#: `"a":{"b":{"b":...` and fails on its item limit: admission cannot see it, generation does.
LATE = {"type": "object", "properties": {"x": {"type": "boolean"}, "a": {"$ref": "#/$defs/inf"}},
        "required": ["x", "a"], "additionalProperties": False,
        "$defs": {"inf": {"type": "object", "properties": {"b": {"$ref": "#/$defs/inf"}}, "required": ["b"]}}}


def events_of(runner, tokenizer, module, requests, **config):
    """Each request's events, in order."""
    engine = LLMEngine(runner, tokenizer, EngineConfig(**{**engine_config(module), **config}), "tiny")

    async def one(r):
        return [ev async for ev in engine.generate(r)]

    async def main():
        return await asyncio.gather(*(one(r) for r in requests))

    engine.start()
    try:
        return asyncio.run(main()), engine
    finally:
        engine.shutdown()


@pytest.mark.parametrize("jump_forward", [False, True])
def test_a_grammar_failing_mid_generation_ends_only_its_request_with_the_reason(runner, tokenizer, module, caplog,
                                                                                jump_forward):
    reqs = [request("late", tokenizer, "Flag:", LATE, temperature=0.0),
            request("person", tokenizer, "Who is it? Alan, 41.", SMALL, temperature=0.0),
            request("free", tokenizer, "Once upon a time", max_tokens=24, temperature=0.0)]
    with caplog.at_level("ERROR"):
        (late, person, free), engine = events_of(runner, tokenizer, module, reqs, jump_forward=jump_forward)
    last = late[-1]
    assert last.finish_reason == "error" and isinstance(last.error, GrammarFailure)
    assert last.error.status == 400 and last.error.param == "response_format" and last.error.code == "grammar_error"
    assert str(last.error).startswith("json mode: the request's schema failed after ")
    assert "Too many items" in str(last.error) and "\n" not in str(last.error)
    assert all(ev.finish_reason is None and ev.error is None for ev in late[:-1])
    assert person[-1].finish_reason == "stop" and free[-1].finish_reason == "length"   # the others are unharmed
    assert engine.stats()["errors"] == 0                                   # no step raised
    grammar_logs = [r for r in caplog.records if "json mode" in r.getMessage()]
    assert len(grammar_logs) == 1 and "late" in grammar_logs[0].getMessage() and not grammar_logs[0].exc_info


def test_eos_from_a_mask_the_grammar_failed_on_is_an_error_not_a_finished_document(runner, tokenizer, module,
                                                                                   monkeypatch):
    """Before admission checked schemas, `{"$ref": "#"}` reached the engine: its grammar failed on
    the first mask, which then allowed only EOS, and the request 'finished' with empty content."""
    import vsc.runtime.engine as engine_mod
    from vsc.runtime import constrain

    def unchecked(tok, vocab, schema):          # the schema as it was compiled before: no dry run
        grammar = constrain.grammar_of(canonical_schema(schema))
        return constrain.Constraint(constrain._llguidance().LLMatcher(
            constrain.compiler_for(tok, vocab).tokenizer, grammar, log_level=0), vocab)

    monkeypatch.setattr(engine_mod, "make_constraint", unchecked)
    ((*_, last),), _ = events_of(runner, tokenizer, module, [request("nothing", tokenizer, "Hi", {"$ref": "#"})])
    assert last.finish_reason == "error" and isinstance(last.error, GrammarFailure)
    assert "NoExtension" in str(last.error)


@pytest.mark.parametrize("schema,match", [
    ({"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}, "forces a document past"),
    ({"$ref": "#"}, "admits no JSON value"),
])
def test_the_engine_admits_or_refuses_a_schema_before_any_event(runner, tokenizer, module, schema, match):
    engine = LLMEngine(runner, tokenizer, EngineConfig(**engine_config(module)), "tiny")
    with pytest.raises(SchemaError, match=match):
        engine.admit_schema(canonical_schema(schema))
    engine.admit_schema(canonical_schema(LATE))

    async def main():
        gen = engine.generate(GenerateRequest("bad", [5, 6, 7], SamplingParams(json_schema=canonical_schema(schema))))
        with pytest.raises(InvalidRequest, match=match):
            await gen.__anext__()

    engine.start()
    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
