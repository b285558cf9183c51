"""The speculative pass: options and their errors, the IR it writes, the manifest's engine
entry, the draft model's share of the KV budget, and the accuracy check's engine run, which
must really draft (and reject drafts) on the tiny model for the check to mean anything."""
from __future__ import annotations

import json
import shutil

import pytest

from vsc.backends.server.emit import engine_config
from vsc.errors import PipelineError, VscError
from vsc.frontend.lower import lower_spec
from vsc.frontend.parser import parse_spec_text
from vsc.models.tiny import make_tiny
from vsc.passes.manager import PassManager
from vsc.runtime.api import EngineConfig

SPEC = """
deployment spec {{
  model "{model}" {{ dtype = f32 }}
  target cpu {{ threads = 1, memory = 256 MiB }}
  workload {{ arrivals = closed(4), prompt_tokens = fixed(32), output_tokens = fixed(16) }}
  accuracy {{ greedy_exact(probes = 4) }}
  serve {{ max_context = 256 }}
}}
"""
BASE = "paged-kv{block=16},continuous-batching{max_batch=8,max_tokens=512}"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("speculative")
    make_tiny(root / "tiny-llama", arch="llama")
    make_tiny(root / "drafts" / "other-llama", arch="llama", seed=1)
    small_vocab = root / "drafts" / "small-vocab"
    shutil.copytree(root / "drafts" / "other-llama", small_vocab)
    cfg = json.loads((small_vocab / "config.json").read_text())
    cfg["vocab_size"] = 1024
    (small_vocab / "config.json").write_text(json.dumps(cfg))
    return root


def lowered(root):
    return lower_spec(parse_spec_text(SPEC.format(model=root / "tiny-llama"), root / "spec.vs"))


def run(root, pipeline):
    return PassManager(pipeline).run(lowered(root))


def test_prompt_lookup_adds_draft_and_verify_stages_and_engine_fields(root):
    m = run(root, BASE + ",speculative{method=prompt-lookup,k=5,ngram=2}")
    stages = [s.name for s in m.requests.stages()]
    assert m.requests.stage("draft").attrs == {"method": "prompt-lookup", "k": 5, "ngram": 2}
    assert m.requests.stage("verify").attrs == {"tokens": 6}
    assert ("decode", "draft") in m.requests.edges() and ("verify", "sample") in m.requests.edges()
    assert ("decode", "sample") not in m.requests.edges() and "draft" in stages
    cfg = engine_config(m)
    assert cfg["speculative_method"] == "prompt-lookup" and cfg["speculative_k"] == 5 and cfg["speculative_ngram"] == 2
    EngineConfig(**cfg)                                   # the runtime accepts the manifest entry
    assert "speculative_method" not in engine_config(run(root, BASE))   # no speculation: no fields


def test_prediction_drafts_from_each_requests_prediction_and_auto_picks_it(root):
    from vsc.passes.auto import DEFAULT_PIPELINE, auto_pipeline
    m = run(root, BASE + ",speculative{method=prediction,k=16}")
    assert m.requests.stage("draft").attrs == {"method": "prediction", "k": 16}
    cfg = engine_config(m)
    assert cfg["speculative_method"] == "prediction" and cfg["speculative_k"] == 16 and "speculative_ngram" not in cfg
    EngineConfig(**cfg)
    with pytest.raises(VscError, match="option ngram is for method=ngram or prompt-lookup, not method=prediction"):
        run(root, BASE + ",speculative{method=prediction,ngram=2}")
    # optimize auto: the default pipeline, plus prediction drafting for a predicted_edit workload
    auto = auto_pipeline({"workload": {"kind": "predicted_edit"}})
    assert auto.replace(",speculative{method=prediction,k=16}", "") == DEFAULT_PIPELINE
    assert "prefix-cache{policy=radix},speculative{method=prediction,k=16}" in auto
    assert auto_pipeline({"workload": {"kind": "code_edit"}}) == auto_pipeline({}) == DEFAULT_PIPELINE
    # behind a long shared prefix, cascade attention (measured to pay at 4096 tokens, not at 768)
    long_prefix = auto_pipeline({"workload": {"kind": "shared_prefix", "shared_prefix": {"tokens": 4096}}})
    assert "prefix-cache{policy=radix},cascade-attention," in long_prefix
    assert auto_pipeline({"workload": {"shared_prefix": {"tokens": 768, "share": 0.9}}}) == DEFAULT_PIPELINE
    PassManager(long_prefix.replace("continuous-batching{max_batch=16,max_tokens=2048}",
                                    "continuous-batching{max_batch=8,max_tokens=512}")).run(lowered(root))


def test_defaults_are_ngram_k4_n3(root):
    attrs = run(root, BASE + ",speculative").requests.stage("draft").attrs
    assert attrs == {"method": "ngram", "k": 4, "ngram": 3}


@pytest.mark.parametrize("pipeline, message", [
    ("speculative", "requires continuous-batching earlier"),
    ("continuous-batching{max_batch=8,max_tokens=512},speculative", "requires paged-kv earlier"),
    (BASE + ",speculative{method=medusa}", "must be one of ngram, prompt-lookup, draft"),
    (BASE + ",speculative{k=0}", "must be >= 1"),
    (BASE + ",speculative{ngram=0}", "must be >= 1"),
])
def test_bad_pipelines_are_refused_in_one_line(root, pipeline, message):
    with pytest.raises(PipelineError) as e:
        run(root, pipeline)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("option, message", [
    ("method=draft", "method=draft needs model=<draft model folder>"),
    ("method=ngram,model=drafts/other-llama", "option model is for method=draft"),
    ("method=draft,model=drafts/other-llama,ngram=2", "option ngram is for method=ngram or prompt-lookup"),
    ("method=draft,model=drafts/missing", "model folder does not exist"),
    ("method=draft,model=drafts/small-vocab", "has a vocabulary of 1024 tokens, the target's has 2048"),
    ("k=63", "k=63 verifies up to 64 tokens for each of max_batch=8 sequences (512)"),
])
def test_bad_options_fail_the_pass_with_one_line(root, option, message):
    from vsc.errors import PassFailure
    with pytest.raises((PassFailure, VscError)) as e:
        run(root, BASE.replace("max_tokens=512", "max_tokens=500") + f",speculative{{{option}}}")
    assert message in str(e.value), str(e.value)
    assert "\n" not in str(e.value).split(" (reproducer")[0]


def test_draft_model_is_resolved_against_the_spec_and_shares_the_kv_budget(root):
    plain = run(root, BASE)
    m = run(root, BASE + ",speculative{method=draft,k=3,model=drafts/other-llama}")
    attrs = m.requests.stage("draft").attrs
    assert attrs == {"method": "draft", "k": 3, "model": str((root / "drafts" / "other-llama").resolve())}
    assert engine_config(m)["draft_model"] == attrs["model"]
    # the draft's weights and KV (same size as the target's here) come out of the budget
    assert m.cache.capacity_tokens < plain.cache.capacity_tokens // 2 + 16
    assert m.cache.capacity_tokens % 16 == 0 and m.cache.capacity_tokens >= 256


def test_draft_plan_is_the_draft_models_default_ir_on_the_target_cache(root):
    from vsc.backends.torch.draft import draft_runner_source
    from vsc.ir.plan import draft_plan
    m = run(root, BASE + ",speculative{method=draft,model=drafts/other-llama}")
    draft = draft_plan(m)
    assert draft.cache.layout == "paged" and draft.cache.block_size == 16
    assert draft.cache.capacity_tokens == m.cache.capacity_tokens
    assert {op.kernel.name for op in draft.model.func.body if op.kind == "repeat" for op in op.region.ops
            if op.kind == "attention"} == {"torch.paged_attention"}
    source = draft_runner_source(m)
    assert f"NUM_BLOCKS = {m.cache.capacity_tokens // 16}" in source and "# model: other-llama (llama" in source
    assert str(root) not in source                        # the folder is given at load time, as for the target
    assert draft_plan(run(root, BASE + ",speculative")) is None and draft_runner_source(run(root, BASE)) is None


@pytest.mark.parametrize("option", ["method=ngram", "method=prompt-lookup", "method=draft,model=drafts/other-llama"])
def test_the_accuracy_checks_engine_run_drafts_and_rejects(root, monkeypatch, option):
    """The check is only worth having if its engine run exercises verification: drafts are
    proposed and some are rejected (engine stats of the run, read at its shutdown)."""
    from vsc.backends.torch.accuracy import check_accuracy
    from vsc.backends.torch.codegen import generate_runner_source, load_runner_class
    from vsc.backends.torch.draft import attach_draft_runner
    from vsc.runtime.engine import LLMEngine

    m = run(root, BASE + f",speculative{{{option}}}")
    runner = load_runner_class(generate_runner_source(m), f"vsc_spec_pass_{abs(hash(option))}")(m.model.attrs["path"])
    attach_draft_runner(m, runner)
    seen = []
    shutdown = LLMEngine.shutdown

    def record(self):
        seen.append(self.stats())
        shutdown(self)

    monkeypatch.setattr(LLMEngine, "shutdown", record)
    report = check_accuracy(m, runner, probes=4, tolerance=None)
    assert report.ok, report.summary()
    (stats,) = seen
    assert stats["spec_draft_tokens"] > stats["spec_accepted_tokens"], stats
    assert any(p.run == "engine-prefix" for p in report.probes)


def test_the_verifier_checks_the_draft_and_verify_stages(root):
    from vsc.ir.verifier import verify

    m = run(root, BASE + ",speculative{k=3}")
    assert verify(m) == []
    m.requests.stage("verify").attrs["tokens"] = 3
    m.requests.stage("draft").attrs["method"] = "medusa"
    m.cache.layout = "contiguous"
    text = "; ".join(map(str, verify(m)))
    assert "verify must check k + 1 = 4 tokens, says 3" in text
    assert "method must be one of ngram, prompt-lookup, draft, prediction, got 'medusa'" in text
    assert "speculative decoding needs a paged KV cache" in text
    m = run(root, BASE + ",speculative")
    m.requests.graph.remove_node("verify")
    m.requests.add_edge("draft", "sample")
    assert "draft and verify stages come together" in "; ".join(map(str, verify(m)))
