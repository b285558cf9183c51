"""PassManager: verify-each, the mutation check, reproducers, dumps, printing, user passes."""
from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest

from vsc.errors import PassFailure, PipelineError, VscError
from vsc.ir.parser import parse_module
from vsc.ir.types import TensorType
from vsc.passes.base import PASSES, Pass, load_pass_file, register_pass
from vsc.passes.instruments import DumpIR, PassTiming, PrintIR
from vsc.passes import manager
from vsc.passes.manager import PassManager
from ir_queries import layer_region, read_pipeline_header

EXAMPLE_PASS = Path(__file__).resolve().parents[2] / "examples" / "passes" / "shortest_first.py"


class MutatesInput(Pass):
    name = "test-mutates-input"

    def run(self, module):
        module.batching.max_batch += 1  # wrong: edits the input in place
        return module.clone()


class BreaksTypes(Pass):
    name = "test-breaks-types"

    def apply(self, module):
        layer_region(module).ops[1].types = [TensorType("f32", ("T", 7))]


class Crashes(Pass):
    name = "test-crashes"

    def apply(self, module):
        raise ZeroDivisionError("oops")


class RefusesPolitely(Pass):
    name = "test-refuses"

    def apply(self, module):
        raise VscError("cannot apply to this module")


@pytest.mark.parametrize("cls,needle", [
    (MutatesInput, "mutated its input"),
    (BreaksTypes, "produced invalid IR: [types."),
    (Crashes, "ZeroDivisionError: oops"),
    (RefusesPolitely, "cannot apply to this module"),
])
def test_failures_name_the_pass_and_leave_a_reproducer(make_module, tmp_path, cls, needle):
    module = make_module()
    with pytest.raises(PassFailure) as e:
        PassManager([cls()], reproducer_dir=tmp_path).run(module)
    assert e.value.pass_name == cls.name and needle in e.value.message
    repro = Path(e.value.reproducer)
    assert repro.parent == tmp_path
    # the reproducer is the pass's input IR, parseable, with the command that replays it
    text = repro.read_text()
    assert f'--passes "{cls.name}"' in text
    replayed = parse_module(text)
    if cls is not MutatesInput:
        assert replayed == module


def test_verify_each_can_be_disabled(make_module):
    out = PassManager([BreaksTypes()], verify_each=False).run(make_module())
    assert layer_region(out).ops[1].types == [TensorType("f32", ("T", 7))]


def test_numeric_check_runs_only_for_passes_that_may_change_outputs(make_module):
    calls = []

    class Lossy(Pass):
        name = "test-lossy"
        may_change_outputs = True

        def apply(self, module):
            module.batching.order = "shortest-first"

    def check(module):
        calls.append(module.batching.order)
        return None

    PassManager("fuse-qkv,fuse-gate-up", numeric_check=check).run(make_module())
    assert calls == []  # exact rewrites need only the structural verifier
    PassManager([Lossy()], numeric_check=check).run(make_module())
    assert calls == ["shortest-first"]


def test_numeric_check_failure_is_reported(make_module):
    class Lossy(Pass):
        name = "test-lossy"
        may_change_outputs = True

        def apply(self, module):
            module.batching.order = "shortest-first"

    with pytest.raises(PassFailure) as e:
        PassManager([Lossy()], numeric_check=lambda m: "probe 0 diverged at position 3").run(make_module())
    assert "changed the model's outputs: probe 0 diverged at position 3" in e.value.message


def test_dump_dir_numbers_files_and_heads_them_with_the_pipeline(make_module, tmp_path):
    dumps = DumpIR(tmp_path / "dumps")
    PassManager("fuse-qkv,paged-kv{block=16}", [dumps]).run(make_module())
    names = [p.name for p in dumps.written]
    assert names == ["000_input.vsir", "001_fuse-qkv.vsir", "002_paged-kv.vsir"]
    assert read_pipeline_header((tmp_path / "dumps" / "002_paged-kv.vsir").read_text()) == "fuse-qkv,paged-kv{block=16}"
    assert parse_module((tmp_path / "dumps" / "001_fuse-qkv.vsir").read_text()).cache.layout == "contiguous"


def test_print_after_change_skips_unchanged(make_module):
    buf = io.StringIO()
    # fuse-qkv twice: the second finds nothing left to fuse
    PassManager("fuse-qkv,fuse-qkv", [PrintIR(after_change=True, stream=buf)]).run(make_module())
    text = buf.getvalue()
    assert "IR after fuse-qkv (#1)" in text and "(#2)" not in text


def test_print_before_and_after_all(make_module):
    buf = io.StringIO()
    PassManager("fuse-qkv,fuse-qkv", [PrintIR(before=True, after=True, stream=buf)]).run(make_module())
    text = buf.getvalue()
    assert text.count("IR before") == 2 and text.count("IR after") == 2 and "(#2) (no change)" in text


def test_print_after_failure_shows_the_bad_ir(make_module, tmp_path):
    buf = io.StringIO()
    with pytest.raises(PassFailure):
        PassManager([BreaksTypes()], [PrintIR(after_failure_=True, stream=buf)], reproducer_dir=tmp_path).run(make_module())
    assert "IR after failed test-breaks-types" in buf.getvalue() and "f32[T, 7]" in buf.getvalue()


def test_timing_reports_each_pass(make_module, monkeypatch):
    """Each pass's row holds the time between the manager's clock readings around its run."""
    readings = iter([10.0, 10.25, 20.0, 20.75])          # fuse-qkv takes 0.25 s, fuse-gate-up 0.75 s
    monkeypatch.setattr(manager, "time", SimpleNamespace(perf_counter=lambda: next(readings)))
    timing = PassTiming()
    PassManager("fuse-qkv,fuse-gate-up", [timing]).run(make_module())
    assert timing.rows == [("fuse-qkv", 0.25, True), ("fuse-gate-up", 0.75, True)]
    assert timing.report().splitlines() == [
        "pass                ms      %  changed",
        "fuse-qkv        250.00   25.0  yes",
        "fuse-gate-up    750.00   75.0  yes",
        "total          1000.00",
    ]


def test_requires_is_checked_when_building_the_pipeline():
    @register_pass
    class NeedsPaged(Pass):
        name = "test-needs-paged"
        requires = ("paged-kv",)

        def apply(self, module):
            pass

    try:
        with pytest.raises(PipelineError, match="requires paged-kv earlier"):
            PassManager("test-needs-paged")
        assert PassManager("paged-kv,test-needs-paged").passes[1].name == "test-needs-paged"
    finally:
        PASSES.pop("test-needs-paged")


def test_user_pass_file_loads_and_runs(make_module):
    try:
        assert load_pass_file(EXAMPLE_PASS) == ["shortest-first"]
        out = PassManager("shortest-first{max_batch=2}").run(make_module())
        assert out.batching.order == "shortest-first" and out.batching.max_batch == 2
        assert out.batching.origin.describe() == "pass shortest-first"
    finally:
        PASSES.pop("shortest-first", None)


def test_example_user_pass_is_under_30_lines():
    assert len(EXAMPLE_PASS.read_text().splitlines()) < 30


def test_bad_user_pass_files(tmp_path):
    with pytest.raises(VscError, match="does not exist"):
        load_pass_file(tmp_path / "nope.py")
    broken = tmp_path / "broken.py"
    broken.write_text("import nonexistent_module_xyz\n")
    with pytest.raises(VscError, match="loading the pass failed: ModuleNotFoundError"):
        load_pass_file(broken)
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(VscError, match="registered no pass"):
        load_pass_file(empty)
