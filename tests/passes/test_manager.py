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
from vsc.passes import instruments as instruments_module
from vsc.passes.instruments import DisablePasses, DumpIR, Instrument, PassStatistics, PassTiming, PrintIR
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


class Recorder(Instrument):
    """Records every hook call: (hook, pass name or None, the module it was given)."""

    def __init__(self, skip: str | None = None):
        self.calls: list[tuple] = []
        self.skip = skip

    def before_pipeline(self, ir):
        self.calls.append(("before_pipeline", None, ir.module))

    def should_run(self, p, index):
        self.calls.append(("should_run", p.name, None))
        return p.name != self.skip

    def before_pass(self, p, index, ir):
        self.calls.append(("before_pass", p.name, ir.module))

    def after_pass(self, p, index, ir, changed, seconds):
        self.calls.append(("after_pass", p.name, ir.module))

    def after_pipeline(self, ir):
        self.calls.append(("after_pipeline", None, ir.module))


def test_instruments_get_the_module_and_no_text_is_printed_unless_asked(make_module, monkeypatch):
    printed = []
    real = instruments_module.print_module
    monkeypatch.setattr(instruments_module, "print_module", lambda m, **kw: printed.append(1) or real(m, **kw))
    rec = Recorder()
    out = PassManager("fuse-qkv,paged-kv{block=16}", [rec]).run(make_module())
    assert printed == []                       # nobody asked for the text: none printed
    assert [(hook, name) for hook, name, _ in rec.calls] == [
        ("before_pipeline", None), ("should_run", "fuse-qkv"), ("before_pass", "fuse-qkv"), ("after_pass", "fuse-qkv"),
        ("should_run", "paged-kv"), ("before_pass", "paged-kv"), ("after_pass", "paged-kv"), ("after_pipeline", None)]
    assert rec.calls[-1][2] is out             # after_pipeline sees the module the run returns
    assert rec.calls[3][2].cache.layout == "contiguous" and rec.calls[6][2].cache.layout == "paged"
    buf = io.StringIO()
    PassManager("fuse-qkv", [PrintIR(after=True, stream=buf), Recorder()]).run(make_module())
    assert len(printed) == 1 and "IR after fuse-qkv (#1)" in buf.getvalue()      # printed once, on demand


def test_should_run_skips_a_pass_and_the_pipeline_text_leaves_it_out(make_module):
    rec = Recorder(skip="fuse-qkv")
    manager = PassManager("fuse-qkv,fuse-gate-up", [rec])
    out = manager.run(make_module())
    assert ("before_pass", "fuse-qkv") not in [(h, n) for h, n, _ in rec.calls]
    assert manager.pipeline_text == "fuse-gate-up"
    region = layer_region(out)
    assert not any(op.kind == "split" and len(op.results) == 3 for op in region.ops)    # q, k, v not fused
    assert any(op.kind == "split" and len(op.results) == 2 for op in region.ops)        # gate/up fused


def test_disable_passes_skips_each_occurrence_and_refuses_what_it_cannot_disable(make_module):
    disable = DisablePasses(("fuse-qkv",))
    manager = PassManager("fuse-qkv,fuse-gate-up,fuse-qkv", [disable])
    disable.check(manager.passes)
    manager.run(make_module())
    assert disable.skipped == ["fuse-qkv (#1)", "fuse-qkv (#3)"] and manager.pipeline_text == "fuse-gate-up"
    with pytest.raises(VscError, match=r"^--disable-pass fuse-qkvv: error: no pass is named 'fuse-qkvv' "
                                       r"\(did you mean 'fuse-qkv'\?\)$"):
        DisablePasses(("fuse-qkvv",)).check(manager.passes)
    with pytest.raises(VscError, match="the pipeline does not run paged-kv"):
        DisablePasses(("paged-kv",)).check(manager.passes)
    with pytest.raises(VscError, match="error: kv-int8 requires it earlier in the pipeline"):
        DisablePasses(("paged-kv",)).check(PassManager("paged-kv,kv-int8").passes)


def test_pass_statistics_count_what_each_pass_did(make_module):
    stats = PassStatistics()
    module = make_module()
    layers = module.model.attrs["layers"]
    PassManager("fuse-qkv,fuse-gate-up,paged-kv{block=16},pack-linear-weights,fuse-qkv", [stats]).run(module)
    by_pass = dict((name, s) for name, s in stats.rows[:4])
    assert by_pass["fuse-qkv"] == {("fused", "qkv"): layers}
    assert by_pass["fuse-gate-up"] == {("fused", "gate/up"): layers}
    assert by_pass["paged-kv{block=16}"] == {}
    # per layer: qkv, o, gate/up, down (4 weights); plus the LM head
    assert by_pass["pack-linear-weights"][("packed", "weights")] == 4 * layers + 1
    assert stats.rows[4] == ("fuse-qkv", {})          # counters are per run: the second finds nothing
    report = stats.report().splitlines()
    assert report[:3] == ["pass statistics:", "  fuse-qkv", f"    fused {layers} qkv"]
    assert "    (nothing counted)" in report


def test_reproducers_without_a_folder_keep_only_the_newest(make_module, tmp_path, monkeypatch):
    monkeypatch.setattr(manager, "REPRODUCER_ROOT", tmp_path / "repros")
    monkeypatch.setattr(manager, "KEEP_REPRODUCERS", 3)
    paths = []
    for _ in range(5):
        with pytest.raises(PassFailure) as e:
            PassManager([RefusesPolitely()]).run(make_module())
        paths.append(Path(e.value.reproducer))
    assert all(p.parent.parent == tmp_path / "repros" for p in paths)
    kept = sorted((tmp_path / "repros").iterdir())
    assert len(kept) == 3 and paths[-1].is_file() and not paths[0].exists()
