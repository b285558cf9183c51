"""Generated runners against the transformers reference: correct plans pass, broken runners fail."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from vsc.backends.torch.accuracy import AccuracyReport, _compare, check_accuracy
from vsc.backends.torch.codegen import generate_runner_source, load_runner_class
from vsc.backends.torch.reference import DEFAULT_TOLERANCE, probe_texts, reference_model, tokenize_probes
from vsc.errors import ModelError
from vsc.frontend.lower import lower_spec
from vsc.frontend.parser import parse_spec_text
from vsc.ir.module import ServingModule
from vsc.models.tiny import make_tiny
from vsc.passes.manager import PassManager

torch.set_num_threads(1)

SPEC = """deployment accuracy_test {{
  model "{path}" {{ dtype = f32 }}
  target cpu {{ threads = 1, memory = 1 GiB }}
  workload {{ arrivals = closed(4), prompt_tokens = fixed(32), output_tokens = fixed(16) }}
  accuracy {{ greedy_exact(probes = 6) }}
  serve {{ max_context = 512 }}
}}
"""

FAILURE = re.compile(r"^probe \d+( \(chunked prefill\)| \(mixed steps\))?(: max \|dlogit\| \S+ at position \d+ exceeds tolerance"
                     r"| diverged at position \d+: expected token \d+ \(logit -?[\d.]+\), got \d+ \(logit -?[\d.]+\); max \|dlogit\| )")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("accuracy-models")
    return {arch: make_tiny(root / f"tiny-{arch}", arch=arch) for arch in ("llama", "qwen2", "mixtral")}


def build(model_dir: Path, pipeline: str) -> ServingModule:
    module = lower_spec(parse_spec_text(SPEC.format(path=model_dir), str(model_dir.parent / "test.vs")))
    return PassManager(pipeline).run(module) if pipeline else module


_counter = iter(range(10**6))


def make_runner(module: ServingModule, source: str | None = None):
    cls = load_runner_class(source or generate_runner_source(module), f"accuracy_runner_{next(_counter)}")
    return cls(module.model.attrs["path"])


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mixtral"])
def test_generated_runner_is_greedy_exact(tiny_dirs, arch, fused, layout):
    passes = (["fuse-qkv", "fuse-gate-up"] if fused else []) + (["paged-kv{block=16}"] if layout == "paged" else [])
    module = build(tiny_dirs[arch], ",".join(passes))
    assert module.cache.layout == layout
    report = check_accuracy(module, make_runner(module), probes=6, tolerance=None)
    assert report.ok, report.summary()
    assert all(p.exact for p in report.probes) and report.near_ties == 0
    assert [p.run for p in report.probes] == ["batched"] * 6 + ["chunked", "mixed"] + ["engine"] * 6 + ["engine-prefix"] * 8
    assert report.max_logit_error < 1e-4
    assert report.summary().startswith("6/6 probes exact over 16 tokens, chunked-prefill run exact, engine run exact; max |dlogit| ")
    json.dumps(report.to_json())


@pytest.fixture(scope="module")
def llama_paged(tiny_dirs) -> ServingModule:
    return build(tiny_dirs["llama"], "fuse-qkv,fuse-gate-up,paged-kv{block=16}")


def test_decode_position_off_by_one_fails(llama_paged):
    """A runner whose decode steps rotate by position + 1 (a classic off-by-one)."""
    runner = make_runner(llama_paged)
    decode = runner.decode

    def shifted(batch):
        batch.positions = batch.positions + 1
        return decode(batch)

    runner.decode = shifted
    report = check_accuracy(llama_paged, runner, probes=4, tolerance=None)
    assert not report.ok
    assert FAILURE.match(report.summary()), report.summary()
    assert report.max_logit_error > 1e-2


def test_wrong_softmax_scale_fails_with_a_divergence(llama_paged):
    source = generate_runner_source(llama_paged)
    scale = llama_paged.model.attrs["head_dim"] ** -0.5
    broken = source.replace(f"ATTN_SCALE = {scale!r}", f"ATTN_SCALE = {scale * 2!r}")
    assert broken != source
    report = check_accuracy(llama_paged, make_runner(llama_paged, broken), probes=4, tolerance=None)
    assert not report.ok
    d = report.first_divergence
    assert d is not None and report.summary() == (
        f"probe {d.probe} diverged at position {d.position}: expected token {d.expected_token} "
        f"(logit {d.expected_logit:.3f}), got {d.got_token} (logit {d.got_logit:.3f}); "
        f"max |dlogit| {report.max_logit_error:.1e}")
    assert d.expected_logit > d.got_logit


def test_decode_that_ignores_the_padding_mask_fails(llama_paged):
    """Batched decode must mask each sequence's padded tail: probes of different lengths share a step."""
    runner = make_runner(llama_paged)
    generated = sys.modules[type(runner).__module__]
    build_meta = generated.attention_metadata

    def unmasked(batch, block_size):
        meta = build_meta(batch, block_size)
        if meta.key_mask is not None:
            meta.key_mask = torch.ones_like(meta.key_mask)
        return meta

    generated.attention_metadata = unmasked
    report = check_accuracy(llama_paged, runner, probes=4, tolerance=None)
    assert not report.ok and FAILURE.match(report.summary()), report.summary()
    # decode gathers whole blocks, so every context is padded to the step's table width (even
    # the longest, unless it fills its last block): the batched run fails
    assert any(p.max_logit_error > 1e-3 for p in report.probes if p.run == "batched")


def test_chunked_prefill_bug_is_caught_by_the_chunked_run(llama_paged):
    """A prefill that forgets the cached context of earlier chunks breaks only the chunked probe."""
    runner = make_runner(llama_paged)
    generated = sys.modules[type(runner).__module__]
    build_meta = generated.attention_metadata

    def forgetful(batch, block_size):
        meta = build_meta(batch, block_size)
        for span in meta.spans:
            span.slots = span.mask = None          # attend to the new chunk only
        return meta

    generated.attention_metadata = forgetful
    report = check_accuracy(llama_paged, runner, probes=3, tolerance=None)
    assert not report.ok
    assert all(p.exact for p in report.probes if p.run != "chunked")
    assert report.summary().startswith("probe 0 (chunked prefill)"), report.summary()


def test_explicit_tolerance_is_a_logit_bar(llama_paged):
    report = check_accuracy(llama_paged, make_runner(llama_paged), probes=2, tolerance=1e-9, max_new_tokens=4)
    assert not report.ok and report.first_divergence is None
    # the worst probe may be one of the engine runs, which name themselves: "probe 5 (through the engine, ...)"
    assert re.match(r"probe \d+( \([^)]*\))?: max \|dlogit\| \S+ at position \d+ exceeds tolerance 1\.0e-09 "
                    r"\(greedy tokens match\)", report.summary())


# --- comparison rules on synthetic logits ---------------------------------------------------


def _logits(rows: list[dict[int, float]], vocab: int = 10) -> torch.Tensor:
    out = torch.zeros(len(rows), vocab)
    for r, row in enumerate(rows):
        for tok, val in row.items():
            out[r, tok] = val
    return out


def test_near_tie_is_reported_not_failed():
    ref = _logits([{3: 5.0}, {4: 2.0, 7: 1.9996}, {1: 3.0}])
    got = ref.clone()
    got[1, 7] = 2.0005                                  # within 1e-3 of the reference everywhere
    result = _compare(2, "batched", [1, 2, 3], [3, 7, 1], got, ref, tolerance=1e-3)
    assert result.divergence is None and result.near_ties == [1] and not result.exact
    report = AccuracyReport(True, 1e-3, 3, [result], result.max_logit_error, 1, None, None)
    assert report.summary() == f"0/1 probes exact over 3 tokens; max |dlogit| {result.max_logit_error:.1e}; 1 near-tie"


def test_clear_divergence_names_probe_position_tokens_and_logits():
    ref = _logits([{3: 5.0}, {3: 1.0}, {412: 5.21, 977: 4.02}], vocab=1000)
    got = ref.clone()
    got[2, 977] = 6.0
    result = _compare(3, "batched", [5], [3, 3, 977], got, ref, tolerance=1e-3)
    d = result.divergence
    assert (d.probe, d.position, d.expected_token, d.got_token) == (3, 2, 412, 977)
    assert d.describe() == "probe 3 diverged at position 2: expected token 412 (logit 5.210), got 977 (logit 4.020)"
    assert d.runner_logit == 6.0


def test_nan_logits_fail():
    ref = _logits([{1: 1.0}])
    got = ref.clone()
    got[0, 5] = float("nan")
    result = _compare(0, "batched", [1], [1], got, ref, tolerance=1e-3)
    assert result.max_logit_error != result.max_logit_error     # NaN is carried, not hidden


# --- probes and reference ---------------------------------------------------------------------


def test_probes_are_deterministic_and_vary_in_length(tiny_dirs):
    assert probe_texts(20) == probe_texts(20) and len(set(probe_texts(20))) == 20
    lengths = [len(p) for p in tokenize_probes(tiny_dirs["llama"], 8, limit=10_000)]
    assert min(lengths) < 16 < max(lengths) and max(lengths) > 64    # shorter and longer than a block
    assert all(len(p) <= 20 for p in tokenize_probes(tiny_dirs["llama"], 8, limit=20))


def test_probes_need_a_readable_tokenizer_json(tmp_path):
    with pytest.raises(ModelError, match=r"no tokenizer.json in the model folder \(the accuracy check tokenizes"):
        tokenize_probes(tmp_path, 2, limit=16)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot read the tokenizer"):
        tokenize_probes(tmp_path, 2, limit=16)


def test_reference_model_is_loaded_once_per_folder(tiny_dirs):
    assert reference_model(tiny_dirs["llama"]) is reference_model(str(tiny_dirs["llama"]))


def test_default_tolerance_depends_on_plan_dtype():
    assert DEFAULT_TOLERANCE["f32"] == 1e-3 and DEFAULT_TOLERANCE["bf16"] > DEFAULT_TOLERANCE["f16"] > DEFAULT_TOLERANCE["f32"]


def test_engine_run_catches_a_block_manager_that_hands_out_a_used_block(tiny_dirs, monkeypatch):
    """A runtime-level bug the runner-only runs cannot see: when a table grows past its first
    block, the block manager hands out the head of the free list without taking it off, so
    the next allocation gets the same block and two sequences write one block's KV. Only
    the run through the engine catches it."""
    from vsc.runtime.block_manager import BlockManager

    real_grow = BlockManager.grow

    def leaky_grow(self, table, n_tokens):
        if table and self.blocks_for(n_tokens) > len(table) and self.free_blocks:
            block = self.free_blocks[0]          # peeked, not popped: still free for the next caller
            self.refcount[block] = 1
            table.append(block)
            return
        real_grow(self, table, n_tokens)

    module = build(tiny_dirs["llama"], "paged-kv{block=16},continuous-batching{max_batch=8,max_tokens=512}")
    runner = make_runner(module)
    monkeypatch.setattr(BlockManager, "grow", leaky_grow)
    report = check_accuracy(module, runner, probes=4, tolerance=None)
    assert not report.ok
    assert report.first_divergence.run.startswith("engine"), report.summary()
    assert all(p.divergence is None for p in report.probes if not p.run.startswith("engine"))
    assert "(through the engine" in report.summary()
