"""The spec frontend on valid input: the examples, units, defaults, syntax forms, locations."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vsc.frontend import units
from vsc.frontend.parser import parse_spec_file, parse_spec_text
from vsc.frontend.spec import OptimizeSpec, ServeSpec

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
TINY_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "max_position_embeddings": 2048}


def fake_model(folder: Path, config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or TINY_CONFIG))
    return folder


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """tmp/examples/*.vs next to tmp/models/tiny-llama (config.json only), as in the repo."""
    shutil.copytree(EXAMPLES, tmp_path / "examples")
    fake_model(tmp_path / "models" / "tiny-llama")
    return tmp_path


def where(text: str, needle: str, nth: int = 0) -> tuple[int, int]:
    """1-based (line, column) of the nth occurrence of `needle` in `text`."""
    pos = -1
    for _ in range(nth + 1):
        pos = text.index(needle, pos + 1)
    line = text.count("\n", 0, pos) + 1
    column = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return line, column


def at(loc) -> tuple[int, int]:
    return loc.line, loc.column


MINIMAL = """\
deployment mini {
  model "models/m" { dtype = f32 }
  target cpu
  workload {
    arrivals = closed(4)
    prompt_tokens = fixed(16)
    output_tokens = fixed(8)
  }
}
"""


def parse(tmp_path: Path, text: str, name: str = "spec.vs"):
    if not (tmp_path / "models" / "m").exists():
        fake_model(tmp_path / "models" / "m")
    return parse_spec_text(text, tmp_path / name)


# ---------------------------------------------------------------------------- examples


def test_chat_example_values(workspace: Path):
    path = workspace / "examples" / "chat.vs"
    spec = parse_spec_file(path)
    assert spec.name == "chat"
    assert spec.file == path.resolve()
    assert spec.model.path == (workspace / "models" / "tiny-llama").resolve()
    assert spec.model.path.is_absolute()
    assert spec.model.dtype == "f32"
    t = spec.target
    assert (t.kind, t.threads, t.memory_bytes, t.arch) == ("cpu", 2, 1 * 2**30, None)
    w = spec.workload
    assert (w.arrivals.kind, w.arrivals.rate, w.arrivals.concurrency) == ("poisson", 8.0, None)
    assert (w.prompt_tokens.kind, w.prompt_tokens.params) == ("uniform", (32.0, 256.0))
    assert (w.output_tokens.kind, w.output_tokens.params) == ("fixed", (64.0,))
    assert w.shared_prefix is None and w.dataset is None
    got = [(s.metric, s.percentile, s.op, s.value) for s in spec.slos]
    assert got == [
        ("ttft", 99.0, "<=", 0.2),
        ("tpot", 50.0, "<=", 0.025),
        ("e2e", 90.0, "<=", 4.0),
        ("throughput", None, ">=", 500.0),
    ]
    assert (spec.accuracy.kind, spec.accuracy.probes, spec.accuracy.tolerance) == ("greedy_exact", 8, None)
    s = spec.serve
    assert (s.host, s.port, s.max_context, s.api) == ("127.0.0.1", 8000, 2048, "openai")
    assert spec.optimize.auto is False
    assert spec.optimize.pipeline == (
        "fuse-qkv,fuse-gate-up,fold-rope-tables,paged-kv{block=16},continuous-batching{max_batch=16,max_tokens=2048},pack-linear-weights,intra-op-threads")


def test_chat_example_locations(workspace: Path):
    path = workspace / "examples" / "chat.vs"
    text = path.read_text()
    spec = parse_spec_file(path)
    assert spec.loc.file == str(path)
    assert at(spec.loc) == where(text, "deployment chat")
    assert at(spec.model.loc) == where(text, 'model "')
    assert at(spec.target.loc) == where(text, "target cpu")
    assert at(spec.workload.loc) == where(text, "workload {")
    assert at(spec.workload.arrivals.loc) == where(text, "poisson(")
    assert at(spec.workload.prompt_tokens.loc) == where(text, "uniform(32")
    assert at(spec.workload.output_tokens.loc) == where(text, "fixed(64)")
    assert [at(s.loc) for s in spec.slos] == [
        where(text, "ttft p99"), where(text, "tpot p50"), where(text, "e2e p90"), where(text, "throughput >=")]
    assert at(spec.accuracy.loc) == where(text, "greedy_exact(probes")
    assert at(spec.serve.loc) == where(text, "serve {")
    assert at(spec.optimize.loc) == where(text, '"fuse-qkv')
    # every location names the file as given
    for loc in (spec.model.loc, spec.target.loc, spec.workload.loc, spec.slos[0].loc, spec.serve.loc):
        assert loc.file == str(path)


def test_shared_prefix_example(workspace: Path):
    spec = parse_spec_file(workspace / "examples" / "shared-prefix.vs")
    w = spec.workload
    assert (w.arrivals.kind, w.arrivals.concurrency, w.arrivals.rate) == ("closed", 16, None)
    assert (w.prompt_tokens.kind, w.prompt_tokens.params) == ("normal", (96.0, 24.0))
    assert (w.output_tokens.kind, w.output_tokens.params) == ("lognormal", (48.0, 0.5))
    assert (w.shared_prefix.tokens, w.shared_prefix.share) == (512, 0.9)
    text = (workspace / "examples" / "shared-prefix.vs").read_text()
    assert at(w.shared_prefix.loc) == where(text, "shared_prefix {")
    assert spec.target.threads == 2 and spec.target.memory_bytes == 2 * 2**30  # ';'-separated
    assert [(s.metric, s.percentile) for s in spec.slos] == [("ttft", 95.0), ("itl", 99.0), ("throughput", None)]
    assert spec.accuracy.kind == "logits_tol"
    assert spec.accuracy.tolerance == pytest.approx(1e-3)
    assert spec.accuracy.probes == 4
    assert spec.serve == ServeSpec(host="127.0.0.1", port=8001, max_context=None, api="openai", loc=spec.serve.loc)
    assert "paged-kv{block=16}" in spec.optimize.pipeline


def test_code_edit_example(workspace: Path):
    spec = parse_spec_file(workspace / "examples" / "code-edit.vs")
    t = spec.target
    assert (t.kind, t.arch, t.memory_bytes, t.threads) == ("cpu", None, 2 * 2**30, 2)
    assert spec.model.dtype == "f32"
    assert spec.optimize.auto is True and spec.optimize.pipeline is None
    assert spec.accuracy.probes == 16
    assert [s.value for s in spec.slos] == [0.5, 0.015, 10.0]
    assert spec.workload.kind == "code_edit"


def test_workload_kind_is_checked(tmp_path: Path):
    from vsc.errors import SpecError
    assert parse(tmp_path, MINIMAL).workload.kind is None
    text = MINIMAL.replace("arrivals = closed(4)", "kind = json; arrivals = closed(4)")
    assert parse(tmp_path, text).workload.kind == "json"
    with pytest.raises(SpecError, match="unknown workload kind 'edits' \\(use chat, shared_prefix, code_edit, json, predicted_edit\\)"):
        parse(tmp_path, MINIMAL.replace("arrivals = closed(4)", "kind = edits; arrivals = closed(4)"))


@pytest.mark.parametrize("name", ["chat", "shared-prefix", "code-edit", "agent-fleet"])
def test_examples_in_repo_parse(name: str, missing_input):
    if not (REPO / "models" / "tiny-llama" / "config.json").is_file():
        missing_input("models/tiny-llama not made (`make models/tiny-llama/config.json`, which `make test` runs)")
    spec = parse_spec_file(EXAMPLES / f"{name}.vs")
    assert spec.model.path == (REPO / "models" / "tiny-llama").resolve()


# ---------------------------------------------------------------------------- units


@pytest.mark.parametrize("number, unit, kind, expected", [
    (200, "ms", units.TIME, 0.2),
    (25, "ms", units.TIME, 0.025),
    (4, "s", units.TIME, 4.0),
    (250, "us", units.TIME, 0.00025),
    (1.5, "s", units.TIME, 1.5),
    (512, "B", units.SIZE, 512),
    (2, "KiB", units.SIZE, 2048),
    (3, "MiB", units.SIZE, 3 * 2**20),
    (1.5, "GiB", units.SIZE, 3 * 2**29),
    (2, "KB", units.SIZE, 2000),
    (7, "MB", units.SIZE, 7_000_000),
    (80, "GB", units.SIZE, 80_000_000_000),
    (8, "req/s", units.RATE, 8.0),
    (0.5, "req/s", units.RATE, 0.5),
    (500, "tok/s", units.THROUGHPUT, 500.0),
])
def test_unit_conversion(number, unit, kind, expected):
    got = units.convert(number, unit, kind)
    assert got == expected
    assert type(got) is (int if kind == units.SIZE else float)


def test_unit_errors_name_the_kind_and_the_units():
    with pytest.raises(units.UnitError, match=r"'200 kg' is not a time \(use ms, s or us\)"):
        units.convert(200, "kg", units.TIME)
    with pytest.raises(units.UnitError, match=r"'4 ms' is not a size \(use B, KiB, MiB, GiB, KB, MB or GB\)"):
        units.convert(4, "ms", units.SIZE)
    with pytest.raises(units.UnitError, match=r"did you mean 'GiB'"):
        units.convert(4, "gib", units.SIZE)
    assert units.unit_kind("tok/s") == units.THROUGHPUT and units.unit_kind("kg") is None


def test_quantities_in_a_spec_are_normalised(tmp_path: Path):
    text = MINIMAL.replace("target cpu", "target cpu { memory = 1.5GiB }").replace(
        "arrivals = closed(4)", "arrivals = poisson(2.5req/s)")
    text = text.replace("}\n}\n", "}\n  slo { ttft p99 <= 250us; tpot p50 <= 0.5 s, e2e p99.9 <= 1e3ms }\n}\n")
    spec = parse(tmp_path, text)
    assert spec.target.memory_bytes == 3 * 2**29
    assert spec.workload.arrivals.rate == 2.5
    assert [(s.percentile, s.value) for s in spec.slos] == [(99.0, 0.00025), (50.0, 0.5), (99.9, 1.0)]


# ---------------------------------------------------------------------------- defaults and forms


def test_defaults_of_optional_sections(tmp_path: Path):
    spec = parse(tmp_path, MINIMAL)
    assert spec.slos == []
    assert (spec.accuracy.kind, spec.accuracy.probes, spec.accuracy.tolerance) == ("greedy_exact", 8, None)
    assert (spec.serve.host, spec.serve.port, spec.serve.max_context, spec.serve.api) == (
        "127.0.0.1", 8000, None, "openai")
    assert spec.optimize == OptimizeSpec(pipeline=None, auto=False)
    assert spec.target == spec.target.__class__(kind="cpu", loc=spec.target.loc)
    assert spec.workload.shared_prefix is None


@pytest.mark.parametrize("written, normal", [
    ("f32", "f32"), ("float32", "f32"), ("bf16", "bf16"), ("bfloat16", "bf16"),
    ("f16", "f16"), ("float16", "f16"), ('"bf16"', "bf16"),
])
def test_dtype_spellings_are_normalised(tmp_path: Path, written: str, normal: str):
    spec = parse(tmp_path, MINIMAL.replace("dtype = f32", f"dtype = {written}"))
    assert spec.model.dtype == normal


def test_dtype_defaults_by_target(tmp_path: Path):
    no_dtype = MINIMAL.replace(' { dtype = f32 }', "")
    assert parse(tmp_path, no_dtype).model.dtype == "f32"
    assert parse(tmp_path, no_dtype.replace("target cpu", "target cuda")).model.dtype == "bf16"


def test_separators_comments_and_layout(tmp_path: Path):
    text = """
# leading comment

deployment   layout{   # comment after brace
  model "models/m" { dtype = f32 };   target cpu { threads = 3; memory = 512 MiB, } ,
  workload { arrivals = closed(2), prompt_tokens = normal(100, 10.5); output_tokens = fixed(
      32,
  ) }

  # a comment between sections
  slo {

    ttft p50 <= 1s   # no space between number and unit
  }
  accuracy { logits_tol(tolerance = 2.5e-2) }
  serve { host = "localhost"; port = 9000 }
}
# trailing comment"""
    spec = parse(tmp_path, text)
    assert spec.name == "layout"
    assert (spec.target.threads, spec.target.memory_bytes) == (3, 512 * 2**20)
    assert spec.workload.prompt_tokens.params == (100.0, 10.5)
    assert spec.workload.output_tokens.params == (32.0,)
    assert spec.slos[0].value == 1.0
    assert spec.accuracy.tolerance == pytest.approx(0.025) and spec.accuracy.probes == 8
    assert (spec.serve.host, spec.serve.port) == ("localhost", 9000)
    assert at(spec.loc) == (4, 1)
    assert at(spec.target.loc) == where(text, "target cpu")
    assert at(spec.slos[0].loc) == (13, 5)


def test_crlf_line_endings(tmp_path: Path):
    spec = parse(tmp_path, MINIMAL.replace("\n", "\r\n"))
    assert at(spec.workload.loc) == (4, 3)
    assert spec.workload.output_tokens.params == (8.0,)


def test_call_arguments_by_position_or_keyword(tmp_path: Path):
    text = MINIMAL.replace("closed(4)", "poisson(rate = 3 req/s)").replace(
        "fixed(16)", "uniform(hi = 40, lo = 10)").replace("fixed(8)", "lognormal(20, sigma = 0.25)")
    w = parse(tmp_path, text).workload
    assert w.arrivals.rate == 3.0
    assert w.prompt_tokens.params == (10.0, 40.0)
    assert w.output_tokens.params == (20.0, 0.25)


def test_whole_numbers_may_be_written_as_floats(tmp_path: Path):
    spec = parse(tmp_path, MINIMAL.replace("target cpu", "target cpu { threads = 4.0 }").replace(
        "closed(4)", "closed(1e2)"))
    assert spec.target.threads == 4 and type(spec.target.threads) is int
    assert spec.workload.arrivals.concurrency == 100


def test_cuda_target_and_accuracy_variants(tmp_path: Path):
    text = MINIMAL.replace("target cpu", "target cuda { arch = sm_80, gpus = 2, memory = 40GB }").replace(
        "}\n}\n", "}\n  accuracy { greedy_exact }\n}\n")
    spec = parse(tmp_path, text)
    assert (spec.target.arch, spec.target.gpus, spec.target.memory_bytes) == ("sm_80", 2, 40 * 10**9)
    assert (spec.accuracy.kind, spec.accuracy.probes) == ("greedy_exact", 8)


def test_optimize_forms(tmp_path: Path):
    def opt(line: str) -> OptimizeSpec:
        return parse(tmp_path, MINIMAL.replace("}\n}\n", "}\n  " + line + "\n}\n")).optimize
    assert (opt("optimize auto").auto, opt("optimize auto").pipeline) == (True, None)
    assert opt('optimize "fuse-qkv, paged-kv{block=32}"').pipeline == "fuse-qkv, paged-kv{block=32}"
    assert opt('optimize ""').pipeline is None and opt('optimize ""').auto is False


def test_shared_prefix_and_dataset(tmp_path: Path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    text = MINIMAL.replace("output_tokens = fixed(8)", 'output_tokens = fixed(8)\n    dataset = "data/prompts.jsonl"\n'
                           "    shared_prefix { share = 0, tokens = 64 }")
    w = parse(tmp_path, text).workload
    assert w.dataset == (tmp_path / "data" / "prompts.jsonl").resolve()
    assert (w.shared_prefix.tokens, w.shared_prefix.share) == (64, 0.0)


def test_string_escapes(tmp_path: Path):
    folder = fake_model(tmp_path / 'we"ird')
    spec = parse(tmp_path, MINIMAL.replace('"models/m"', '"we\\"ird"'))
    assert spec.model.path == folder.resolve()


def test_paths_are_relative_to_the_spec_file_not_the_cwd(tmp_path: Path, monkeypatch):
    sub = tmp_path / "specs" / "deep"
    sub.mkdir(parents=True)
    fake_model(tmp_path / "specs" / "models" / "m")
    (sub / "d.vs").write_text(MINIMAL.replace('"models/m"', '"../models/m"'))
    monkeypatch.chdir(tmp_path)
    spec = parse_spec_file(Path("specs/deep/d.vs"))
    assert spec.model.path == (tmp_path / "specs" / "models" / "m").resolve()
    assert spec.file == (sub / "d.vs").resolve()
    assert spec.loc.file == "specs/deep/d.vs"  # locations keep the path as the user gave it


def test_absolute_model_path(tmp_path: Path):
    folder = fake_model(tmp_path / "elsewhere" / "qwen", {"model_type": "qwen2"})
    spec = parse(tmp_path, MINIMAL.replace('"models/m"', json.dumps(str(folder))))
    assert spec.model.path == folder.resolve()


def test_names_that_are_also_units_are_fine_as_keys(tmp_path: Path):
    # `s`, `ms`, `B` are units after a number but plain names anywhere else
    text = MINIMAL.replace("target cpu", "target cpu { threads = 2 }")
    spec = parse(tmp_path, text.replace("deployment mini", "deployment s"))
    assert spec.name == "s"
