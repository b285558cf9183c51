"""Workloads: same seed -> same requests, lengths as asked, each kind's shape (prefix, copy, schema)."""
from __future__ import annotations

import re

import numpy as np
import pytest

from vsc.bench import workloads as wl
from vsc.bench.workloads import (Arrival, BenchRequest, LengthDist, TextSource, WorkloadError, build_workload, closed,
                                 poisson)
from vsc.models.tiny import make_tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("bench-wl") / "tiny-llama", arch="llama")


@pytest.fixture(scope="module")
def source(model_dir) -> TextSource:
    return TextSource.for_model(model_dir)


KINDS = sorted(wl.WORKLOADS)


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_workload_other_seed_other(source, kind):
    a = build_workload(kind, source, 12, seed=7, arrival=poisson(3.0), max_context=2048)
    b = build_workload(kind, source, 12, seed=7, arrival=poisson(3.0), max_context=2048)
    c = build_workload(kind, source, 12, seed=8, arrival=poisson(3.0), max_context=2048)
    assert a.requests == b.requests and a.arrival_times == b.arrival_times
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
    assert [r.prompt for r in a.requests] != [r.prompt for r in c.requests]


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_tokens_is_the_reencoded_length_and_context_is_respected(source, kind):
    w = build_workload(kind, source, 10, seed=1, arrival=closed(2), max_context=1024)
    for r in w.requests:
        assert isinstance(r, BenchRequest) and r.prompt and r.max_tokens >= 1
        assert r.prompt_tokens == source.count(r.prompt)
        assert r.prompt_tokens + r.max_tokens <= 1024 - 8


def test_arrival_rate_does_not_change_the_prompts(source):
    a = build_workload("chat", source, 8, seed=3, arrival=poisson(1.0))
    b = build_workload("chat", source, 8, seed=3, arrival=poisson(9.0))
    c = build_workload("chat", source, 8, seed=3, arrival=closed(4))
    assert a.requests == b.requests == c.requests
    assert a.arrival_times != b.arrival_times and c.arrival_times is None


def test_chat_lengths_follow_the_distributions(source):
    w = build_workload("chat", source, 40, seed=2, arrival=closed(1),
                       prompt_tokens=LengthDist("fixed", (100,)), output_tokens=LengthDist("uniform", (10, 20)))
    assert all(abs(r.prompt_tokens - 100) <= 2 for r in w.requests)
    assert sum(r.prompt_tokens == 100 for r in w.requests) >= 30          # the cut usually lands exactly
    outs = [r.max_tokens for r in w.requests]
    assert min(outs) >= 10 and max(outs) <= 20 and len(set(outs)) > 3


def test_length_distributions():
    rng = np.random.default_rng(0)
    assert LengthDist.parse("64") == LengthDist("fixed", (64.0,))
    assert LengthDist.parse("uniform(32, 256)") == LengthDist("uniform", (32.0, 256.0))
    assert LengthDist.from_ir({"kind": "normal", "params": [96.0, 24.0]}) == LengthDist("normal", (96.0, 24.0))
    u = LengthDist("uniform", (3, 5)).sample(rng, 2000)
    assert set(u) == {3, 4, 5}
    ln = LengthDist.parse("lognormal(48, 0.5)").sample(rng, 40000)
    assert abs(np.mean(ln) - 48) < 1.0                                     # `mean` is the distribution's mean
    assert np.median(ln) < 48                                              # right-skewed
    assert min(LengthDist("normal", (2, 10)).sample(rng, 1000)) >= 1      # clipped to >= 1
    assert max(LengthDist("normal", (100, 50)).sample(rng, 1000, hi=120)) <= 120
    for bad in ("poisson(3)", "uniform(5)", "uniform(9, 2)", "fixed(x)", "normal(10, -1)", "12 tokens"):
        with pytest.raises(WorkloadError):
            LengthDist.parse(bad)


def test_poisson_arrivals():
    rng = np.random.default_rng(0)
    t = wl.arrival_offsets(poisson(20.0), 4000, rng)
    assert t[0] == 0.0 and all(b >= a for a, b in zip(t, t[1:]))
    assert abs(np.mean(np.diff(t)) - 1 / 20.0) < 0.05 / 20.0 * 4        # mean gap 1/rate (within 20%)
    assert wl.arrival_offsets(poisson(float("inf")), 5, rng) == [0.0] * 5
    assert wl.arrival_offsets(closed(3), 5, rng) is None
    for bad in (lambda: poisson(0), lambda: closed(0), lambda: Arrival("burst", rate=1.0)):
        with pytest.raises(WorkloadError):
            bad()


def test_shared_prefix_shape(source):
    w = build_workload("shared-prefix", source, 60, seed=4, arrival=closed(4), prefix_tokens=512, share=0.75,
                       prompt_tokens=LengthDist("fixed", (40,)))
    sharing = [r for r in w.requests if r.meta["shared_tokens"] > 0]
    alone = [r for r in w.requests if r.meta["shared_tokens"] == 0]
    assert 0.55 <= len(sharing) / len(w.requests) <= 0.95
    assert abs(w.params["prefix_tokens"] - 512) <= 4
    prefix = sharing[0].prompt[:sharing[0].prompt.index("User: ")]
    assert len(prefix) > 1000
    assert all(r.prompt.startswith(prefix) for r in sharing)
    assert all(r.meta["shared_tokens"] >= w.params["prefix_tokens"] - 1 for r in sharing)
    assert all(not r.prompt.startswith(prefix[:200]) for r in alone)
    # the unique turns differ
    assert len({r.prompt[len(prefix):] for r in sharing}) == len(sharing)
    assert all(r.prompt_tokens < w.params["prefix_tokens"] - 400 for r in alone)


def test_code_edit_output_copies_the_prompt(source):
    w = build_workload("code-edit", source, 24, seed=5, arrival=poisson(2.0), max_context=2048)
    kinds = {r.meta["edit"] for r in w.requests}
    assert "rename" in kinds and "header" in kinds
    for r in w.requests:
        expected = r.meta["expected_output"]
        assert expected.endswith("\n```")
        assert r.max_tokens == source.count(expected)
        code = r.prompt.split("```python\n", 1)[1].split("\n```", 1)[0]
        if r.meta["edit"] == "rename":
            old, new = re.search(r"Rename the identifier `(\w+)` to `(\w+)`", r.prompt).groups()
            assert re.search(rf"\b{old}\b", code) and not re.search(rf"\b{old}\b", expected)
            assert expected[:-4] == re.sub(rf"\b{old}\b", new, code)
        elif r.meta["edit"] == "header":
            assert expected[:-4] == "# Reviewed: no functional change.\n" + code
        assert r.meta["copied_line_fraction"] >= 0.5 or r.meta["edit"] == "drop-comments"
    assert np.mean([r.meta["copied_line_fraction"] for r in w.requests]) > 0.8


def test_predicted_edit_requests_carry_the_snippet_before_the_edit(source):
    plain = build_workload("code-edit", source, 8, seed=5, arrival=closed(1), max_context=2048)
    w = build_workload("predicted-edit", source, 8, seed=5, arrival=closed(1), max_context=2048)
    assert w.name == "predicted-edit"
    for a, r in zip(plain.requests, w.requests):
        assert (a.max_tokens, a.meta) == (r.max_tokens, r.meta) and not a.extra
        code = a.prompt.split("```python\n", 1)[1].split("\n```", 1)[0]
        assert r.extra == {"prediction": {"type": "content", "content": code + "\n```"}}
        # the same edit asked through the model's chat template, the assistant's code block opened
        if source.chat is not None:
            assert code in r.prompt and r.prompt.endswith("```python\n") and r.prompt != a.prompt
            assert r.prompt.startswith(source.chat([{"role": "user", "content": "x"}])[:10])


def test_json_requests_carry_their_schema(source):
    w = build_workload("json", source, 12, seed=6, arrival=closed(1))
    assert {r.meta["schema"] for r in w.requests} <= set(wl.JSON_SCHEMAS)
    for r in w.requests:
        fmt = r.extra["response_format"]
        assert fmt["type"] == "json_schema"
        schema = fmt["json_schema"]["schema"]
        assert schema == wl.JSON_SCHEMAS[fmt["json_schema"]["name"]]
        assert set(schema["required"]) <= set(schema["properties"])
        assert '"required"' in r.prompt and r.prompt.endswith("JSON:\n")


def test_corpus_lists_are_fixed_and_sorted(source):
    assert list(wl.DOC_MODULES) == sorted(wl.DOC_MODULES)
    assert list(wl.CODE_MODULES) == sorted(wl.CODE_MODULES)
    assert source.prose_tokens > 10000 and len(source.code) >= 5


def test_bad_requests_for_a_workload(source):
    with pytest.raises(WorkloadError, match="unknown workload"):
        build_workload("poetry", source, 3)
    with pytest.raises(WorkloadError, match="at least one"):
        build_workload("chat", source, 0)
    with pytest.raises(WorkloadError, match="no tokenizer.json"):
        build_workload("chat", "/nonexistent-model-dir", 3)


def test_same_workload_in_another_process(source, model_dir):
    """Nothing depends on the interpreter's hash seed or on state of this process."""
    import os
    import subprocess
    import sys

    here = build_workload("code-edit", source, 6, seed=11, arrival=poisson(2.0)).fingerprint()
    code = ("from vsc.bench.workloads import build_workload, poisson; import sys; "
            "print(build_workload('code-edit', sys.argv[1], 6, seed=11, arrival=poisson(2.0)).fingerprint())")
    out = subprocess.run([sys.executable, "-c", code, str(model_dir)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == here
