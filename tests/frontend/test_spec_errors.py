"""The spec frontend on bad input: each mistake is one SpecError at the right line:column."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vsc.errors import SpecError
from vsc.frontend.parser import parse_spec_file, parse_spec_text

# Line and column numbers in the cases below refer to this text (after each case's edit).
BASE = """\
deployment demo {
  model "models/tiny" { dtype = f32 }
  target cpu { threads = 2, memory = 4 GiB }
  workload {
    arrivals = poisson(8 req/s)
    prompt_tokens = uniform(32, 256)
    output_tokens = fixed(64)
  }
  slo {
    ttft p99 <= 200 ms
    throughput >= 500 tok/s
  }
  accuracy { greedy_exact(probes = 8) }
  serve { port = 8000, max_context = 1024 }
  optimize auto
}
"""
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "max_position_embeddings": 2048}


def make_model(root: Path, config_text: str | None = json.dumps(CONFIG)) -> Path:
    folder = root / "models" / "tiny"
    folder.mkdir(parents=True, exist_ok=True)
    if config_text is not None:
        (folder / "config.json").write_text(config_text)
    return folder


def spec_error(text: str, root: Path) -> SpecError:
    path = root / "demo.vs"
    with pytest.raises(SpecError) as info:
        parse_spec_text(text, path)
    err = info.value
    assert err.location.file == str(path)
    return err


def edit(old: str, new: str) -> str:
    assert BASE.count(old) == 1, old
    return BASE.replace(old, new)


def test_base_spec_is_valid(tmp_path: Path):
    make_model(tmp_path)
    spec = parse_spec_text(BASE, tmp_path / "demo.vs")
    assert spec.name == "demo" and spec.serve.max_context == 1024


CASES = [
    # --- syntax
    ("unexpected-character", "memory = 4 GiB", "memory = 4 GiB @", 3, 44, "unexpected character '@'"),
    ("missing-separator", "threads = 2, memory", "threads = 2 memory", 3, 28,
     "expected a newline, ',' or ';' before 'memory'"),
    ("unclosed-block", "  optimize auto\n}\n", "  optimize auto\n", 15, 16,
     "expected '}' but found end of file"),
    ("unclosed-call", "fixed(64)", "fixed(64", 7, 29, "expected ')' or ',' but found end of line"),
    ("stray-brace", "  optimize auto\n}\n", "  optimize auto\n}\n}\n", 17, 1,
     "unexpected '}': there is no open block to close"),
    ("missing-value", "port = 8000", "port = ", 14, 18, "expected a value but found ','"),
    ("unterminated-string", '"models/tiny" {', '"models/tiny {', 2, 9, "unterminated string"),
    ("colon-for-equals", "port = 8000", "port: 8000", 14, 15, "unexpected character ':'"),
    ("empty-spec", BASE, "# nothing here\n", 1, 1, "empty spec: expected 'deployment <name> { ... }'"),
    ("not-a-deployment", "deployment demo {", "deploy demo {", 1, 1,
     "expected 'deployment <name> { ... }' but found 'deploy' (did you mean 'deployment'?)"),
    ("number-out-of-range", "threads = 2", "threads = 1e999", 3, 26, "number '1e999' is out of range"),
    # --- structure
    ("unknown-section", "  slo {", "  slos {", 9, 3, "unknown section 'slos' in deployment (did you mean 'slo'?)"),
    ("unknown-key", "threads = 2", "thread = 2", 3, 16, "unknown key 'thread' in target cpu (did you mean 'threads'?)"),
    ("unknown-key-no-suggestion", "port = 8000", "banana = 8000", 14, 11, "unknown key 'banana' in serve"),
    ("unknown-overload-policy", "port = 8000", "overload = drop", 14, 22,
     "unknown overload policy 'drop' (one of: queue, shed)"),
    ("unknown-api", "port = 8000", "api = grpc", 14, 17, "unknown api 'grpc' (vsc serves: openai)"),
    ("api-not-a-name", "port = 8000", "api = 1", 14, 17, "api must be a name, got '1'"),
    ("duplicate-key", "port = 8000,", "port = 8000, port = 9000,", 14, 24,
     "duplicate key 'port' in serve (first given on line 14)"),
    ("duplicate-section", "  workload {", "  target cpu\n  workload {", 4, 3,
     "duplicate section 'target' in deployment (first given on line 3)"),
    ("missing-section", BASE[BASE.index("  workload {"):BASE.index("  slo {")], "", 1, 1,
     "deployment 'demo' is missing the 'workload' section"),
    ("missing-workload-key", "    arrivals = poisson(8 req/s)\n", "", 4, 3, "workload is missing 'arrivals'"),
    ("key-used-as-section", "port = 8000", "port { x = 1 }", 14, 11, "'port' is written 'port = 8000'"),
    ("deployment-without-name", "deployment demo {", "deployment {", 1, 1, "the deployment needs a name"),
    # --- units
    ("bad-unit", "200 ms", "200 kg", 10, 17, "'200 kg' is not a time (use ms, s or us)"),
    ("size-given-a-time", "4 GiB", "4 ms", 3, 38, "'4 ms' is not a size (use B, KiB, MiB, GiB, KB, MB or GB)"),
    ("rate-given-throughput", "8 req/s", "8 tok/s", 5, 24, "'8 tok/s' is not a request rate (use req/s)"),
    ("throughput-given-rate", "500 tok/s", "500 req/s", 11, 19, "'500 req/s' is not a token throughput (use tok/s)"),
    ("missing-unit", "200 ms", "200", 10, 17, "ttft needs a unit: '200' is not a time"),
    ("unit-where-none-belongs", "threads = 2", "threads = 2 GiB", 3, 26, "threads is a plain number, without a unit"),
    # --- values
    ("bad-dtype", "dtype = f32", "dtype = f8", 2, 33, "unknown dtype 'f8' (use f32, bf16 or f16)"),
    ("bad-target-kind", "target cpu", "target tpu", 3, 10, "unknown target 'tpu' (use cpu or cuda)"),
    ("gpu-means-cuda", "target cpu", "target gpu", 3, 10, "unknown target 'gpu' (did you mean 'cuda'?)"),
    ("cpu-key-on-cuda", "target cpu", "target cuda", 3, 17,
     "'threads' is not valid for target cuda (only for target cpu)"),
    ("bad-arch", "target cpu { threads = 2, memory = 4 GiB }", "target cuda { arch = volta }", 3, 24,
     "arch must look like sm_NN"),
    ("zero-threads", "threads = 2", "threads = 0", 3, 26, "threads must be a positive whole number, got '0'"),
    ("negative-memory", "4 GiB", "-4 GiB", 3, 38, "memory must be positive, got '-4 GiB'"),
    ("fractional-threads", "threads = 2", "threads = 2.5", 3, 26, "threads must be a whole number, got '2.5'"),
    ("string-for-number", "threads = 2", 'threads = "2"', 3, 26, "threads must be a number, got string \"2\""),
    ("negative-probes", "probes = 8", "probes = -1", 13, 36, "probes must be a positive whole number, got '-1'"),
    ("zero-rate", "8 req/s", "0 req/s", 5, 24, "the poisson rate must be positive, got '0 req/s'"),
    ("zero-concurrency", "poisson(8 req/s)", "closed(0)", 5, 23,
     "the closed-loop concurrency must be a positive whole number, got '0'"),
    ("unknown-distribution", "fixed(64)", "fixd(64)", 7, 21,
     "unknown output_tokens distribution 'fixd' (did you mean 'fixed'?)"),
    ("too-many-arguments", "fixed(64)", "fixed(64, 2)", 7, 31, "too many arguments to fixed: expected fixed(n)"),
    ("uniform-reversed", "uniform(32, 256)", "uniform(256, 32)", 6, 21, "needs lo <= hi"),
    ("share-out-of-range", "    output_tokens = fixed(64)\n",
     "    output_tokens = fixed(64)\n    shared_prefix { tokens = 16, share = 1.5 }\n", 8, 42,
     "share must be between 0 and 1, got '1.5'"),
    ("missing-dataset", "    output_tokens = fixed(64)\n",
     '    output_tokens = fixed(64)\n    dataset = "nope.jsonl"\n', 8, 15, "dataset file 'nope.jsonl' not found"),
    ("max-context-beyond-model", "max_context = 1024", "max_context = 4096", 14, 38,
     "max_context 4096 is longer than the model's max_position_embeddings (2048)"),
    ("port-out-of-range", "port = 8000", "port = 70000", 14, 18, "port must be between 1 and 65535"),
    ("unknown-accuracy-check", "greedy_exact(", "greedy(", 13, 14,
     "unknown accuracy check 'greedy' (did you mean 'greedy_exact'?)"),
    ("bad-optimize", "optimize auto", "optimize fast", 15, 12,
     "optimize takes a pipeline string in double quotes or 'auto', got 'fast'"),
    # --- objectives
    ("bad-percentile", "ttft p99", "ttft p75", 10, 10, "unknown percentile 'p75' (use p50, p90, p95, p99 or p99.9)"),
    ("missing-percentile", "ttft p99 <=", "ttft <=", 10, 10, "ttft needs a percentile"),
    ("latency-lower-bound", "ttft p99 <=", "ttft p99 >=", 10, 14, "ttft is an upper bound: use '<=', not '>='"),
    ("throughput-upper-bound", "throughput >=", "throughput <=", 11, 16, "throughput is a lower bound"),
    ("unknown-metric", "ttft p99", "ttfb p99", 10, 5, "unknown metric 'ttfb' in slo (did you mean 'ttft'?)"),
    ("duplicate-objective", "    throughput >= 500 tok/s\n", "    throughput >= 500 tok/s\n    ttft p99 <= 1 s\n",
     12, 5, "duplicate objective 'ttft p99' (first given on line 10)"),
]


@pytest.mark.parametrize("old, new, line, column, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_spec(tmp_path: Path, old: str, new: str, line: int, column: int, message: str):
    make_model(tmp_path)
    text = BASE.replace(old, new) if old == BASE else edit(old, new)
    err = spec_error(text, tmp_path)
    assert (err.location.line, err.location.column) == (line, column), err.render()
    assert message in err.message, err.render()
    assert str(err).startswith(f"{tmp_path / 'demo.vs'}:{line}:{column}: error: ")


def test_shedding_needs_a_ttft_objective(tmp_path: Path):
    make_model(tmp_path)
    text = edit("ttft p99 <= 200 ms", "tpot p99 <= 20 ms").replace("port = 8000", "overload = shed")
    err = spec_error(text, tmp_path)
    assert (err.location.line, err.location.column) == (14, 22), err.render()
    assert "overload = shed sheds requests that would miss the TTFT objective; the slo block has none" in err.message
    queued = parse_spec_text(text.replace("overload = shed", "overload = queue"), tmp_path / "demo.vs")
    assert queued.serve.overload == "queue"     # queueing needs no objective


MODEL_CASES = [
    ("missing-config", None, "model folder 'models/tiny' has no config.json"),
    ("invalid-json", "{not json", "config.json in 'models/tiny' is not valid JSON"),
    ("not-an-object", "[1, 2]", "config.json in 'models/tiny' is not a JSON object"),
    ("no-model-type", json.dumps({"architectures": ["X"]}), "config.json in 'models/tiny' has no \"model_type\""),
    ("unsupported-architecture", json.dumps({"model_type": "gpt2"}),
     "unsupported model_type 'gpt2' in 'models/tiny' (vsc supports llama, mistral, mixtral, qwen2)"),
]


@pytest.mark.parametrize("config_text, message", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_bad_model_folder(tmp_path: Path, config_text: str | None, message: str):
    make_model(tmp_path, config_text)
    err = spec_error(BASE, tmp_path)
    assert (err.location.line, err.location.column) == (2, 9)  # the path string
    assert message in err.message


def test_missing_model_folder(tmp_path: Path):
    err = spec_error(BASE, tmp_path)  # no models/ at all
    assert (err.location.line, err.location.column) == (2, 9)
    assert "model folder 'models/tiny' not found" in err.message
    assert str(tmp_path / "models" / "tiny") in err.message


def test_model_path_that_is_a_file(tmp_path: Path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").write_text("not a folder")
    err = spec_error(BASE, tmp_path)
    assert "model path 'models/tiny' is neither a folder nor a .gguf file" in err.message


def test_model_gguf_file_that_is_not_gguf(tmp_path: Path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.gguf").write_bytes(b"GGML" + bytes(64))
    err = spec_error(BASE.replace('"models/tiny"', '"models/tiny.gguf"'), tmp_path)
    assert "model file 'models/tiny.gguf': not a GGUF file (bad magic bytes)" in err.message


def test_render_points_a_caret_at_the_mistake(tmp_path: Path):
    make_model(tmp_path)
    err = spec_error(edit("threads = 2", "thread = 2"), tmp_path)
    lines = err.render().splitlines()
    assert lines[0] == (f"{tmp_path / 'demo.vs'}:3:16: error: "
                        "unknown key 'thread' in target cpu (did you mean 'threads'?)")
    assert lines[1] == "    " + "  target cpu { thread = 2, memory = 4 GiB }"
    assert lines[2] == "    " + " " * 15 + "^"


def test_missing_spec_file_is_a_spec_error(tmp_path: Path):
    with pytest.raises(SpecError, match="spec file not found"):
        parse_spec_file(tmp_path / "absent.vs")


def test_only_one_deployment_per_file(tmp_path: Path):
    make_model(tmp_path)
    err = spec_error(BASE + BASE, tmp_path)
    assert (err.location.line, err.location.column) == (17, 1)
    assert "only one deployment per file" in err.message


# ---------------------------------------------------------------------------- robustness


@pytest.mark.parametrize("text, message", [
    ("deployment x { a = " + "f(" * 3000 + ")" * 3000 + " }", "calls are nested more than"),
    ("deployment x {" + "a {" * 3000 + "}" * 3001, "blocks are nested more than"),
])
def test_deep_nesting_is_a_spec_error_not_a_crash(tmp_path: Path, text: str, message: str):
    assert message in spec_error(text, tmp_path).message


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    make_model(root)
    return root


def _parse_or_spec_error(text: str, root: Path) -> None:
    try:
        parse_spec_text(text, root / "demo.vs")
    except SpecError as err:
        assert err.location.line >= 1 and err.location.column >= 1
        err.render()


SPEC_ALPHABET = st.sampled_from(list('{}()=<>,;#"\\\n\t .-+e0123456789') + [
    "deployment", "model", "target", "workload", "slo", "cpu", "cuda", "ms", "GiB", "req/s", "tok/s",
    "p99", "p99.9", "fixed(", "poisson(", "auto", '"models/tiny"', "threads", "share", "\x00", "é", "\r",
])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text())
def test_random_text_parses_or_raises_spec_error(fuzz_root: Path, text: str):
    _parse_or_spec_error(text, fuzz_root)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(SPEC_ALPHABET, max_size=40).map("".join))
def test_spec_like_tokens_parse_or_raise_spec_error(fuzz_root: Path, text: str):
    _parse_or_spec_error(text, fuzz_root)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(BASE)), st.integers(0, 8), st.lists(SPEC_ALPHABET, max_size=6).map("".join))
def test_edited_base_spec_parses_or_raises_spec_error(fuzz_root: Path, pos: int, cut: int, insert: str):
    _parse_or_spec_error(BASE[:pos] + insert + BASE[pos + cut:], fuzz_root)
