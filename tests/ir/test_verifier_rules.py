"""Every verifier rule (`vsc verify --list`) has an IR that only it refuses.

RULE_CASES maps each rule to (base, mutate[, implied]): `base` is a pipeline run on the small
llama module (or a pass golden file's output, or the module computing in bf16), which verifies
clean (the rule's positive test); `mutate` breaks it so that this rule, and no other, refuses
the result (its negative test); `implied`, where given, names the rules that cannot hold when
this one breaks (a part cut off the request graph has an entry and an exit of its own).
The meta-test fails when a rule listed by `vsc verify --list` has no case, so a new rule
arrives with its failing IR; the mutant test makes each check's condition False in turn and
requires its rule's case to notice."""
from __future__ import annotations

import copy
import re
import sys
import types
from pathlib import Path

import pytest

from vsc.cli import main
from vsc.ir.hf_import import build_model_graph
from vsc.ir.parser import parse_module
from vsc.ir.module import KernelRef, Stage, Weight, walk_ops
from vsc.ir.types import Origin, TensorType, pass_origin
from vsc.ir import verifier
from vsc.ir.verifier import RULES, verify
from vsc.passes.manager import PassManager
from ir_queries import layer_region

GOLDEN_DIR = Path(__file__).resolve().parent / "golden_passes"
SPEC = Origin("spec", "test.vs", 1, 1)
PAGED = "paged-kv{block=16}"
CONTINUOUS = "paged-kv{block=16},continuous-batching{max_batch=4,max_tokens=256}"
SPECULATIVE = "paged-kv{block=16},continuous-batching{max_batch=4,max_tokens=256},speculative{k=2,ngram=2}"
JSON = "json-mode{schema=any}"
PACKED = "paged-kv{block=8,tokens=4096},continuous-batching{max_batch=64,max_tokens=1024},pack-linear-weights"
QUANT = "fuse-qkv,quantize-weights{format=q4_1,include_head=true}"
REPLICATED = "paged-kv{block=16},replicate{n=2,router=prefix_affinity}"


def op(m, kind, nth=0, region=True):
    ops = layer_region(m).ops if region else m.model.func.body
    return [o for o in ops if o.kind == kind][nth]


def repeat(m):
    return op(m, "repeat", region=False)


def weight(m, name="@model.layers.{i}.self_attn.q_proj.weight"):
    return m.model.weight(name)


def set_attr(obj, **kv):
    for k, v in kv.items():
        setattr(obj, k, v)


def stage(m, name):
    return m.requests.stage(name)


def shadow(m):
    """The region's argument takes the name of an outer value (%h0) and its uses follow."""
    r = repeat(m).region
    old = r.args[0][0]
    r.args[0] = ("%h0", r.args[0][1])
    for o in r.ops:
        o.operands = ["%h0" if x == old else x for x in o.operands]


def loop_carried(m):
    """The region yields f32[T, 64] (the mlp's gate) around a loop that carries f32[T, 32]."""
    layer_region(m).yields = ["%gate"]


def two_entries(m):
    """A second source stage: tokenize no longer follows ingress (still connected through admit)."""
    m.requests.graph.remove_edge("ingress", "tokenize")
    m.requests.add_stage(Stage("prefix_lookup", {}, SPEC))
    m.requests.add_edge("ingress", "prefix_lookup")
    m.requests.add_edge("prefix_lookup", "admit")


def loaded(name, shape=(32, 32)):
    return Weight(name, TensorType("f32", shape), "load", [name[1:]], {}, SPEC)


def derived(m, fn=None):
    """The first weight derived by `fn` (any derivation but concat when None)."""
    return next(w for w in m.model.weights if (w.init_fn == fn if fn else w.init_fn not in ("load", "concat")))


def copy_of_packed(m):
    packed = derived(m, "onednn_pack")
    m.model.weights.append(Weight("@copy", packed.type, "concat", [packed.name], {"axis": 0}, SPEC))


def speculate_on_contiguous_cache(m):
    """Well-formed draft / verify stages (as the speculative pass writes them) on a contiguous cache."""
    m.requests.insert_between(Stage("draft", {"method": "ngram", "k": 2, "ngram": 2}, SPEC), "decode", "sample")
    m.requests.insert_between(Stage("verify", {"tokens": 3}, SPEC), "draft", "sample")


def route_after_admit(m):
    """The route stage moved onto admit -> prefill (it must decide before admission)."""
    g = m.requests.graph
    g.remove_edge("tokenize", "route"), g.remove_edge("route", "admit"), g.remove_edge("admit", "prefill")
    m.requests.add_edge("tokenize", "admit"), m.requests.add_edge("admit", "route"), m.requests.add_edge("route", "prefill")


RULE_CASES = {
    "requests.replicas": (REPLICATED, lambda m: m.deployment.__setitem__("replicas", 0)),
    "requests.route-replicas": (REPLICATED, lambda m: m.deployment.__setitem__("replicas", 1)),
    "requests.route-feeds-admit": (REPLICATED, route_after_admit),
    "requests.route-policy": (REPLICATED, lambda m: stage(m, "route").attrs.__setitem__("policy", "random")),
    "requests.route-params": (REPLICATED, lambda m: stage(m, "route").attrs.__setitem__("prefix_blocks", 0)),
    "ssa.defined-once": ("", lambda m: layer_region(m).ops.insert(0, copy.deepcopy(op(m, "rmsnorm")))),
    "ssa.def-before-use": ("", lambda m: layer_region(m).ops.insert(0, layer_region(m).ops.pop(1))),
    "ssa.returns-defined": ("", lambda m: setattr(m.model.func, "returns", ["%nowhere", "%next"])),
    "ssa.region-no-shadowing": ("", shadow),
    "ssa.yields-defined": ("", lambda m: setattr(layer_region(m), "yields", ["%nowhere"])),
    "weights.declared-once": ("", lambda m: m.model.weights.append(copy.deepcopy(weight(m)))),
    "weights.load-args": ("", lambda m: setattr(weight(m), "init_args", ["a", "b"])),
    "weights.derived-from-declared": ("fuse-qkv", lambda m: derived(m, "concat").init_args.__setitem__(0, "@missing")),
    "weights.concat-shape": ("fuse-qkv", lambda m: derived(m, "concat").init_attrs.__setitem__("axis", 1)),
    "weights.derived-type": (QUANT, lambda m: set_attr(derived(m), type=TensorType("q8_0", derived(m).type.shape))),
    "weights.known-init": ("fuse-qkv", lambda m: set_attr(derived(m, "concat"), init_fn="glue")),
    "weights.packed-not-derived": (PACKED, copy_of_packed),
    "weights.packed-onednn-only": (PACKED, lambda m: set_attr(next(o for o in walk_ops(m.model.func.body) if o.kernel is not None and o.kernel.name == "torch.linear_onednn"), kernel=KernelRef("torch.linear"))),
    "weights.operands-declared": ("", lambda m: op(m, "linear").operands.__setitem__(1, "@missing.weight")),
    "weights.layer-in-region": ("", lambda m: op(m, "rmsnorm", region=False).operands.__setitem__(1, "@model.layers.{i}.input_layernorm.weight")),
    "weights.expert-in-moe": ("", lambda m: (m.model.weights.append(loaded("@model.layers.{i}.experts.{e}.w", shape=(32, 32))), op(m, "linear").operands.__setitem__(1, "@model.layers.{i}.experts.{e}.w"))),
    "types.weight-type": ("", lambda m: m.model.weights.append(loaded("@bad", shape=(32, 0)))),
    "types.quant-blocks": ("", lambda m: m.model.weights.append(Weight("@q", TensorType("q4_1", (32, 40)), "load", ["q"], {}, SPEC))),
    "types.known-dtype": ("", lambda m: set_attr(m.model.func, params=[(n, TensorType("f7", t.shape) if n == "%positions" else t) for n, t in m.model.func.params])),
    "types.declared-symbols": ("", lambda m: set_attr(m.model.func, symbols=["T"])),
    "types.known-op": ("", lambda m: set_attr(op(m, "silu"), kind="swish", kernel=None)),
    "types.arity": ("", lambda m: set_attr(op(m, "silu"), operands=["%gate", "%up"])),
    "types.op-rule": ("", lambda m: op(m, "attention").attrs.__setitem__("kv_heads", 3)),
    "types.inferred": ("", lambda m: set_attr(op(m, "linear"), types=[TensorType("f32", ("T", 999))])),
    "types.result-count": ("", lambda m: set_attr(op(m, "sample", region=False), results=["%next", "%extra"])),
    "types.repeat-region": ("", lambda m: set_attr(repeat(m), region=None)),
    "types.region-args": ("", lambda m: repeat(m).operands.append("%h0")),
    "types.loop-carried": ("", loop_carried),
    "types.repeat-results": ("", lambda m: set_attr(repeat(m), types=[TensorType("f32", ("T", 64))])),
    "kernels.control-none": ("", lambda m: set_attr(repeat(m), kernel=KernelRef("torch.add"))),
    "kernels.present": ("", lambda m: set_attr(op(m, "rmsnorm"), kernel=None)),
    "kernels.known": ("", lambda m: set_attr(op(m, "rmsnorm"), kernel=KernelRef("torch.nothing"))),
    "kernels.implements-op": ("", lambda m: set_attr(op(m, "rmsnorm"), kernel=KernelRef("torch.linear"))),
    "kernels.runs-on-target": ("", lambda m: set_attr(op(m, "rmsnorm"), kernel=KernelRef("triton.rmsnorm"))),
    "kernels.no-native": ("", lambda m: op(m, "rmsnorm").attrs.__setitem__("native", True)),
    "kernels.cache-layout": ("", lambda m: set_attr(op(m, "attention"), kernel=KernelRef("torch.paged_attention"))),
    "kernels.cache-dtype": (PAGED + ",kv-int8", lambda m: set_attr(op(m, "attention"), kernel=KernelRef("torch.paged_attention"))),
    "kernels.compute-dtype": ("bf16", lambda m: set_attr(op(m, "rmsnorm"), kernel=KernelRef("tvm.rmsnorm"))),
    "kernels.weight-dtype": (QUANT, lambda m: set_attr(op(m, "linear", region=False), kernel=KernelRef("torch.linear"))),
    "model.step-returns": ("", lambda m: set_attr(m.model.func, returns=["%next", "%logits"])),
    "model.layer-count": ("", lambda m: repeat(m).attrs.__setitem__("count", 3)),
    "model.kv-attrs": ("", lambda m: m.model.attrs.__setitem__("kv_heads", "2")),
    "target.kind": ("", lambda m: set_attr(m.target, kind="tpu")),
    "target.cuda-arch": ("golden:select-kernels-cuda", lambda m: m.target.attrs.__setitem__("arch", "hopper")),
    "target.threads": ("", lambda m: m.target.attrs.__setitem__("threads", -1)),
    "target.memory": ("", lambda m: m.target.attrs.__setitem__("memory", 0)),
    "target.intra-op-cpu": ("golden:select-kernels-cuda", lambda m: m.schedule.attrs.__setitem__("intra_op_threads", 1)),
    "target.intra-op-range": ("", lambda m: m.schedule.attrs.__setitem__("intra_op_threads", 2)),
    "target.graph-form": ("", lambda m: m.schedule.attrs.__setitem__("graph", "xla")),
    "target.relax-compiles": ("", lambda m: m.schedule.attrs.__setitem__("graph", "relax")),
    "cache.max-context": ("", lambda m: m.deployment.__setitem__("max_context", "x")),
    "cache.layout": ("", lambda m: set_attr(m.cache, layout="ring")),
    "cache.dtype": ("", lambda m: set_attr(m.cache, dtype="f8")),
    "cache.block-size": ("", lambda m: set_attr(m.cache, block_size=128)),
    "cache.whole-blocks": (PAGED, lambda m: set_attr(m.cache, capacity_tokens=m.cache.capacity_tokens - 8)),
    "cache.budget": ("", lambda m: set_attr(m.cache, budget_bytes=m.cache.budget_bytes // 1000)),
    "cache.holds-context": ("", lambda m: set_attr(m.cache, capacity_tokens=512)),
    "cache.prefix-sharing": (PAGED, lambda m: set_attr(m.cache, prefix_sharing="hash")),
    "cache.prefix-sharing-paged": ("", lambda m: set_attr(m.cache, prefix_sharing="radix")),
    "cache.eviction": ("", lambda m: set_attr(m.cache, eviction="fifo")),
    "batching.mode": ("", lambda m: set_attr(m.batching, mode="eager")),
    "batching.order": ("", lambda m: set_attr(m.batching, order="lifo")),
    "batching.preemption": ("", lambda m: set_attr(m.batching, preemption="swap")),
    "batching.max-batch": ("", lambda m: set_attr(m.batching, max_batch=0)),
    "batching.decode-fits": (CONTINUOUS + ",chunked-prefill{tokens=4}", lambda m: set_attr(m.batching, max_tokens=3, chunked_prefill=3)),
    "batching.prefill-fits": ("", lambda m: set_attr(m.batching, max_tokens=100)),
    "batching.chunk-range": (CONTINUOUS + ",chunked-prefill{tokens=64}", lambda m: set_attr(m.batching, chunked_prefill=-1)),
    "batching.chunk-continuous": ("", lambda m: set_attr(m.batching, chunked_prefill=64)),
    "requests.known-stages": ("", lambda m: m.requests.insert_between(Stage("teleport", {}, pass_origin("bad")), "decode", "sample")),
    "requests.nonempty": ("", lambda m: [m.requests.graph.remove_node(n) for n in list(m.requests.graph)]),
    "requests.acyclic": ("", lambda m: m.requests.add_edge("decode", "admit")),
    # a part apart from ingress -> ... -> stream has entries and exits of its own (or a cycle)
    "requests.connected": ("", lambda m: m.requests.add_stage(Stage("prefix_lookup", {}, SPEC)),
                           {"requests.entry-ingress", "requests.exit-stream"}),
    "requests.entry-ingress": ("", two_entries),
    "requests.exit-stream": ("", lambda m: (m.requests.add_stage(Stage("prefix_lookup", {}, SPEC)), m.requests.add_edge("sample", "prefix_lookup"))),
    "requests.prefill-before-decode": ("", lambda m: (m.requests.graph.remove_edge("prefill", "decode"), m.requests.graph.remove_edge("decode", "sample"), m.requests.add_edge("admit", "decode"), m.requests.add_edge("decode", "prefill"), m.requests.add_edge("prefill", "sample"))),
    "requests.tpot-slo": (CONTINUOUS + ",chunked-prefill{tokens=64}", lambda m: stage(m, "prefill").attrs.__setitem__("tpot_slo_ms", -1)),
    "requests.tpot-needs-chunking": ("", lambda m: stage(m, "prefill").attrs.__setitem__("tpot_slo_ms", 50)),
    "requests.constrain-feeds-sample": (JSON, lambda m: m.requests.add_edge("constrain", "detokenize")),
    "requests.constrain-after-decode": (JSON, lambda m: (m.requests.graph.remove_edge("decode", "constrain"), m.requests.add_edge("decode", "sample"), m.requests.add_edge("prefill", "constrain"))),
    "requests.constrain-grammar": (JSON, lambda m: stage(m, "constrain").attrs.__setitem__("grammar", "regex")),
    "requests.constrain-schema": (JSON, lambda m: stage(m, "constrain").attrs.__setitem__("schema", "[1]")),
    "requests.constrain-sha256": (JSON, lambda m: stage(m, "constrain").attrs.__setitem__("sha256", "0" * 64)),
    "requests.overload-policy": ("", lambda m: stage(m, "admit").attrs.__setitem__("overload", "drop")),
    "requests.shed-slo": ("", lambda m: stage(m, "admit").attrs.__setitem__("overload", "shed")),
    "requests.speculative-pair": (SPECULATIVE, lambda m: (m.requests.graph.remove_edge("draft", "verify"), m.requests.add_edge("draft", [s for s in m.requests.graph.successors("verify")][0]), m.requests.graph.remove_node("verify"))),
    "requests.draft-feeds-verify": (SPECULATIVE, lambda m: m.requests.add_edge("draft", "sample")),
    "requests.draft-after-decode": (SPECULATIVE, lambda m: (m.requests.graph.remove_edge("decode", "draft"), m.requests.add_edge("prefill", "draft"), m.requests.add_edge("decode", "verify"))),
    "requests.verify-to-sample": (SPECULATIVE, lambda m: (m.requests.graph.remove_edge("verify", "sample"), m.requests.add_edge("verify", "detokenize"), m.requests.add_edge("decode", "sample"))),
    "requests.draft-method": (SPECULATIVE, lambda m: stage(m, "draft").attrs.__setitem__("method", "beam")),
    "requests.draft-k": (SPECULATIVE, lambda m: stage(m, "draft").attrs.__setitem__("k", 0)),
    "requests.verify-tokens": (SPECULATIVE, lambda m: stage(m, "verify").attrs.__setitem__("tokens", 7)),
    "requests.draft-ngram": (SPECULATIVE, lambda m: stage(m, "draft").attrs.__setitem__("ngram", 0)),
    "requests.draft-model": (SPECULATIVE, lambda m: stage(m, "draft").attrs.update(method="draft")),
    "requests.speculative-paged": ("", speculate_on_contiguous_cache),
}


def build(make_module, tmp_path, base: str):
    """`golden:NAME`: the module a pass golden file expects (tests/ir/golden_passes/NAME.vsir);
    else the small llama module after the pipeline `base`."""
    if base.startswith("golden:"):
        return parse_module((GOLDEN_DIR / f"{base[7:]}.vsir").read_text().split("// EXPECTED:\n")[1])
    if base == "bf16":      # the small llama computing in bf16 (make_module wrote its folder under tmp_path)
        m = make_module()
        m.model = build_model_graph(tmp_path / "small-llama", dtype="bf16")
        m.model.attrs["path"] = "models/small-llama"
        return m
    m = make_module("mixtral" if base == "mixtral" else "llama")
    if base and base != "mixtral":
        m = PassManager(base).run(m)
    return m


@pytest.mark.parametrize("rule", sorted(RULE_CASES))
def test_rule_base_is_valid(make_module, tmp_path, rule):
    """Positive: the module the rule's case starts from breaks no rule."""
    assert [str(d) for d in verify(build(make_module, tmp_path, RULE_CASES[rule][0]))] == []


@pytest.mark.parametrize("rule", sorted(RULE_CASES))
def test_rule_refuses_its_case(make_module, tmp_path, rule):
    """Negative: the rule's mutation is refused by that rule and no other."""
    base, mutate, *implied = RULE_CASES[rule]
    m = build(make_module, tmp_path, base)
    mutate(m)
    diags = verify(m)
    assert {d.rule for d in diags} == {rule, *(implied[0] if implied else ())}, [f"{d.rule}: {d}" for d in diags]


def test_every_listed_rule_has_a_failing_case(capsys):
    """Meta: each rule `vsc verify --list` prints has a case here (and the cases name no unknown rule)."""
    assert main(["verify", "--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert listed == list(RULES)
    assert sorted(set(listed) - set(RULE_CASES)) == []
    assert sorted(set(RULE_CASES) - set(listed)) == []


GUARD = re.compile(r"^(\s*(?:if|elif) ).*:\s*$")
REPORT = re.compile(r'self\.add\((f?)"([a-z]+\.[a-z0-9-]*)|problems\.append\(\("([a-z0-9.-]+)"|return \[\("([a-z0-9.-]+)"')


def reports(lines: list[str]):
    """(index of the if/elif directly guarding a report, or None, the rules that report can name)."""
    for i, line in enumerate(lines):
        hit = REPORT.search(line)
        if hit is None:
            continue
        indent = len(line) - len(line.lstrip())
        above = next(j for j in range(i - 1, -1, -1) if lines[j].strip() and
                     len(lines[j]) - len(lines[j].lstrip()) < indent)
        guard = above if GUARD.match(lines[above]) else None    # else in a loop or an except: the case covers it
        if hit.group(1):        # f"batching.{field_name}": any rule of that group
            rules = [r for r in RULES if r.startswith(hit.group(2))]
        else:
            rules = [hit.group(2) or hit.group(3) or hit.group(4)]
        yield guard, rules


def test_skipping_any_rule_check_fails_that_rules_case(make_module, tmp_path, monkeypatch):
    """Mutants: each if/elif guarding a report in vsc/ir/verifier.py, made `if False:`, changes
    what the verifier says about the case of the rule it reports (so no rule's check can be
    dropped with its tests still passing)."""
    cases = {}
    for rule, (base, mutate, *_) in RULE_CASES.items():
        m = build(make_module, tmp_path, base)
        mutate(m)
        cases[rule] = m
    expected = {rule: {d.rule for d in verify(m)} for rule, m in cases.items()}
    lines = Path(verifier.__file__).read_text().split("\n")
    sites = list(reports(lines))
    assert {r for _, rules in sites for r in rules} == set(RULES)     # every rule's report is found
    survivors = []
    for guard, rules in sites:
        if guard is None:
            continue
        mutant = list(lines)
        mutant[guard] = GUARD.sub(r"\1False:", lines[guard])
        module = types.ModuleType("verifier_mutant")
        monkeypatch.setitem(sys.modules, module.__name__, module)    # its dataclass looks itself up
        exec(compile("\n".join(mutant), verifier.__file__, "exec"), module.__dict__)
        try:
            said = {r: {d.rule for d in module.verify(cases[r])} for r in rules}
        except Exception:       # the unguarded path crashes on the case: killed
            continue
        if all(said[r] == expected[r] for r in rules):
            survivors.append(f"line {guard + 1}: {lines[guard].strip()} ({', '.join(rules)})")
    assert survivors == [], "\n".join(survivors)
