"""The structural verifier: every invariant a ServingModule must keep, written down here.

`verify(module)` returns all diagnostics (empty = valid); `verify_or_raise` raises
VerificationError. Each diagnostic names the invariant, the node and the node's origin,
so a failure after a pass says which pass made the bad node.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import networkx as nx

from vsc.errors import VerificationError
from vsc.ir.kernels import GRAPH_FORMS, KERNELS, decode_step_blockers
from vsc.ir.module import Op, ServingModule, Weight, is_weight, walk_ops
from vsc.ir.ops import OPS, TypeRuleError, infer, operand_arity_ok
from vsc.ir.sizes import CACHE_DTYPES, kv_bytes_per_token
from vsc.ir.types import FLOAT_DTYPES, KNOWN_DTYPES, QUANT_DTYPES, Origin, TensorType
from vsc.ir.weight_inits import WEIGHT_INIT_RULES
from vsc.runtime.enums import (BATCHING_MODES, CONSTRAIN_GRAMMARS, EVICTION_POLICIES, KV_CACHE_LAYOUTS,
                               NGRAM_SPECULATIVE_METHODS, OVERLOAD_POLICIES, PREEMPTION_POLICIES, PREFIX_CACHE_POLICIES,
                               ROUTER_POLICIES, SCHEDULING_ORDERS, SPECULATIVE_METHODS, TARGET_KINDS)

# name -> what it guarantees. Tests and `vsc verify --list` read this table.
INVARIANTS = {
    "ssa": "every value is defined once, before its uses, in an enclosing scope; returns and yields name defined values",
    "weights": "every weight operand is declared; derived weights name declared weights and agree in shape; "
               "a oneDNN-packed weight is read only by linears via torch.linear_onednn and feeds no other derivation; "
               "{i} weights appear only inside a repeat region, {e} weights only as expert operands",
    "types": "each op's operands and attributes satisfy its typing rule and its declared result types equal the "
             "inferred ones; shapes use only declared symbols; repeat regions carry their types around the loop",
    "kernels": "every compute op names a kernel that exists, implements that op kind, runs on the target and "
               "suits the cache layout and dtype (an int8 cache needs an int8 attention kernel, a float one a float "
               "kernel) and reads its weights' element types (a q4_1 weight needs a kernel that accepts q4_1 blocks); "
               "control ops (repeat) name none",
    "model": "the layer region repeats exactly config `layers` times; the step returns logits [B, vocab] and tokens",
    "target": "target kind is cpu or cuda, with a valid arch (sm_NN) for cuda, non-negative threads and positive memory; "
              "the schedule's intra_op_threads, when set, is a positive int no larger than the target's threads (cpu only); "
              "its graph is eager or relax, and a relax plan's decode forward has a compiled form (every op's kernel)",
    "cache": "the layout, dtype (f32, bf16, f16, or i8 with per-token-head scales), prefix sharing and eviction are known values; block size is positive (max_context for a "
             "contiguous cache: one block per slot) and divides the capacity; capacity holds at least one max_context sequence (all batch slots when contiguous) and "
             "capacity x bytes per token fits the budget; prefix sharing needs a paged cache",
    "batching": "mode, order and preemption are known values; 1 <= max_batch <= max_tokens; without chunked prefill "
                "the step budget holds a whole max_context prompt; chunked prefill is 0 or within the budget and "
                "needs continuous batching",
    "requests": "the request graph is acyclic and connected, runs from `ingress` to `stream`, uses known stage kinds, "
                "and prefill comes before decode; a constrain stage lies between decode and sample and carries "
                "its grammar (a JSON Schema object as JSON text, with that text's sha256); draft and verify stages "
                "(speculative decoding) come together after decode, on a paged cache, verify checking k + 1 tokens; "
                "the admit stage's overload policy, when set, is queue or shed, and shed carries a positive ttft_slo_ms; "
                "a plan of several replicas has a route stage (a known router policy) feeding admit, and only such a plan",
}

# rule name -> the one invariant it checks; each rule belongs to the group before its dot. Every
# diagnostic names its rule; `vsc verify --list` lists them, and tests/ir/test_verifier_rules.py
# holds, per rule, an IR that only that rule refuses (a meta-test fails for a rule without one).
RULES = {
    "ssa.defined-once": "a value is defined once (params, op results, region arguments)",
    "ssa.def-before-use": "an operand is defined before its use, in an enclosing scope",
    "ssa.returns-defined": "the step returns defined values",
    "ssa.region-no-shadowing": "a repeat region's argument does not shadow an outer value",
    "ssa.yields-defined": "a repeat region yields defined values",
    "weights.declared-once": "a weight is declared once",
    "weights.load-args": "load() names one checkpoint tensor",
    "weights.derived-from-declared": "a derived weight names declared weights",
    "weights.concat-shape": "a concat weight's type is its parts joined on its axis",
    "weights.derived-type": "a derived weight satisfies its init function's typing rule (vsc/ir/weight_inits.py)",
    "weights.known-init": "a weight's init function is load or a known derivation",
    "weights.packed-not-derived": "no weight is derived from a oneDNN-packed weight",
    "weights.packed-onednn-only": "a oneDNN-packed weight is read only by linears via torch.linear_onednn",
    "weights.operands-declared": "every weight operand is declared",
    "weights.layer-in-region": "{i} (per-layer) weights appear only inside a repeat region",
    "weights.expert-in-moe": "{e} (per-expert) weights appear only as moe operands",
    "types.weight-type": "a weight has a known dtype and static positive dims",
    "types.quant-blocks": "a quantized weight is [out, in] with in a multiple of its 32-element blocks",
    "types.known-dtype": "every value type has a known dtype",
    "types.declared-symbols": "shapes use only the step's declared symbols",
    "types.known-op": "every op kind is known",
    "types.arity": "an op has the operands its kind takes",
    "types.op-rule": "an op's operands and attributes satisfy its kind's typing rule",
    "types.inferred": "an op's declared result types equal the inferred ones",
    "types.result-count": "an op declares one type per result",
    "types.repeat-region": "a repeat op has a region",
    "types.region-args": "a repeat region's arguments match the repeat's operands in number and type",
    "types.loop-carried": "a repeat region yields the types of its arguments: the loop carries one type around",
    "types.repeat-results": "a repeat's result types are its region's carried types",
    "kernels.control-none": "control ops (repeat) name no kernel",
    "kernels.present": "every compute op names a kernel",
    "kernels.known": "the kernel exists",
    "kernels.implements-op": "the kernel implements the op's kind",
    "kernels.runs-on-target": "the kernel runs on the target",
    "kernels.no-native": "no op asks for the removed C++ decode kernel (attribute native)",
    "kernels.cache-layout": "the kernel suits the cache layout",
    "kernels.cache-dtype": "the kernel reads the cache's dtype (an int8 cache needs an int8 attention kernel)",
    "kernels.compute-dtype": "the kernel computes in the op's float dtype",
    "kernels.weight-dtype": "the kernel reads its weight's element type (a q4_1 weight needs a q4_1 kernel)",
    "model.step-returns": "the step returns logits [B, vocab] and tokens i64[B]",
    "model.layer-count": "the layer region repeats exactly config `layers` times",
    "model.kv-attrs": "the model gives int layers, kv_heads and head_dim",
    "target.kind": "the target kind is known (vsc.runtime.enums.TARGET_KINDS)",
    "target.cuda-arch": "a cuda target has an arch of the form sm_NN",
    "target.threads": "the target's threads is a non-negative int",
    "target.memory": "the target's memory is a positive number of bytes",
    "target.intra-op-cpu": "the schedule's intra_op_threads is set only for cpu targets",
    "target.intra-op-range": "the schedule's intra_op_threads is a positive int no larger than the target's threads",
    "target.graph-form": "the schedule's graph is eager or relax",
    "target.relax-compiles": "a relax plan's decode forward has a compiled form (every op's kernel)",
    "cache.max-context": "the deployment's max_context is a positive int",
    "cache.layout": "the cache layout is known (vsc.runtime.enums.KV_CACHE_LAYOUTS)",
    "cache.dtype": "the cache dtype is f32, bf16, f16, or i8 with per-token-head scales",
    "cache.block-size": "the block size is positive (max_context for a contiguous cache: one block per slot)",
    "cache.whole-blocks": "the block size divides the capacity",
    "cache.budget": "capacity x bytes per token fits the budget",
    "cache.holds-context": "the capacity holds a max_context sequence (all batch slots when contiguous)",
    "cache.prefix-sharing": "prefix sharing is a policy the runtime runs (vsc.runtime.enums.PREFIX_CACHE_POLICIES)",
    "cache.prefix-sharing-paged": "prefix sharing needs a paged cache",
    "cache.eviction": "eviction is known (vsc.runtime.enums.EVICTION_POLICIES)",
    "batching.mode": "the batching mode is one the runtime runs (vsc.runtime.enums.BATCHING_MODES)",
    "batching.order": "the admission order is one the runtime runs (vsc.runtime.enums.SCHEDULING_ORDERS)",
    "batching.preemption": "preemption is known (vsc.runtime.enums.PREEMPTION_POLICIES)",
    "batching.max-batch": "max_batch >= 1",
    "batching.decode-fits": "max_batch <= max_tokens: a decode step fits the step budget",
    "batching.prefill-fits": "without chunked prefill the step budget holds a whole max_context prompt",
    "batching.chunk-range": "chunked prefill is 0 (off) or within the step budget",
    "batching.chunk-continuous": "chunked prefill needs continuous batching",
    "requests.known-stages": "every stage kind is known",
    "requests.nonempty": "the request graph has stages",
    "requests.acyclic": "the request graph is acyclic",
    "requests.connected": "the request graph is connected",
    "requests.entry-ingress": "the only entry stage is ingress",
    "requests.exit-stream": "the only exit stage is stream",
    "requests.prefill-before-decode": "decode is reachable from prefill",
    "requests.tpot-slo": "the prefill stage's tpot_slo_ms, when set, is a positive number of ms",
    "requests.tpot-needs-chunking": "tpot_slo_ms needs chunked prefill",
    "requests.constrain-feeds-sample": "a constrain stage feeds exactly the sample stage",
    "requests.constrain-after-decode": "a constrain stage is reachable from decode",
    "requests.constrain-grammar": "a constrain stage's grammar is known (vsc.runtime.enums.CONSTRAIN_GRAMMARS)",
    "requests.constrain-schema": "a constrain stage's schema is a JSON Schema object as JSON text",
    "requests.constrain-sha256": "a constrain stage's sha256 is its schema text's",
    "requests.overload-policy": "the admit stage's overload policy, when set, is queue or shed",
    "requests.shed-slo": "overload = shed carries a positive ttft_slo_ms",
    "requests.speculative-pair": "draft and verify stages (speculative decoding) come together",
    "requests.draft-feeds-verify": "the draft stage feeds exactly the verify stage",
    "requests.draft-after-decode": "the draft stage is reachable from decode",
    "requests.verify-to-sample": "the verify stage leads to sample",
    "requests.draft-method": "the draft method is known (vsc.runtime.enums.SPECULATIVE_METHODS)",
    "requests.draft-k": "the draft stage's k is an integer >= 1",
    "requests.verify-tokens": "the verify stage checks k + 1 tokens",
    "requests.draft-ngram": "an n-gram draft method carries ngram, an integer >= 1",
    "requests.draft-model": "method draft carries the draft model's folder (model)",
    "requests.speculative-paged": "speculative decoding needs a paged KV cache",
    "requests.replicas": "the deployment's replicas, when set, is an int >= 1",
    "requests.route-replicas": "a plan has a route stage exactly when it has more than one replica",
    "requests.route-feeds-admit": "a route stage feeds exactly the admit stage and follows tokenize",
    "requests.route-policy": "the route stage's policy is known (vsc.runtime.enums.ROUTER_POLICIES)",
    "requests.route-params": "prefix_affinity carries prefix_blocks, an int >= 1; ttft_slo_ms, when set, is a positive number of ms",
}
assert {r.split(".")[0] for r in RULES} == set(INVARIANTS)

KNOWN_STAGES = {"ingress", "tokenize", "route", "prefix_lookup", "admit", "prefill", "decode", "draft", "verify",
                "constrain", "sample", "detokenize", "stream"}
_TEMPLATE_VARS = re.compile(r"\{([a-z])\}")


def _int(v) -> bool:
    """An int attribute value (not a bool: True reads as 1 in Python, never in the IR)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _static_dim(d) -> bool:
    return _int(d) and d > 0


@dataclass
class Diagnostic:
    check: str
    node: str
    message: str
    origin: Origin
    rule: str = ""      # the RULES entry it breaks; `check` is its group

    def __str__(self) -> str:
        return f"[{self.rule or self.check}] {self.node}: {self.message} (from {self.origin.describe()})"


class _Checker:
    def __init__(self, module: ServingModule):
        self.m = module
        self.diags: list[Diagnostic] = []
        self.weights: dict[str, Weight] = {}

    def add(self, rule: str, node: str, message: str, origin: Origin) -> None:
        if rule not in RULES:
            raise KeyError(f"verifier rule {rule!r} is not in RULES")
        self.diags.append(Diagnostic(rule.split(".")[0], node, message, origin, rule))

    # -- model graph -----------------------------------------------------------
    def check_weights(self) -> None:
        malformed: set[str] = set()    # weights whose own type is already reported: no derivation check reads them
        for w in self.m.model.weights:
            node = f"weight {w.name}"
            if w.name in self.weights:
                self.add("weights.declared-once", node, "declared twice", w.origin)
            self.weights[w.name] = w
            if w.type.dtype not in KNOWN_DTYPES or not all(_static_dim(d) for d in w.type.shape):
                self.add("types.weight-type", node, f"weight type {w.type} must have a known dtype and static positive dims", w.origin)
                malformed.add(w.name)
            elif w.type.dtype in QUANT_DTYPES and (w.type.rank != 2 or w.type.shape[1] % 32):
                self.add("types.quant-blocks", node, f"a {w.type.dtype} weight is [out, in] with in a multiple of its 32-element "
                                        f"blocks, got {w.type}", w.origin)
        for w in self.m.model.weights:
            node = f"weight {w.name}"
            if w.init_fn == "load":
                if len(w.init_args) != 1 or is_weight(w.init_args[0]):
                    self.add("weights.load-args", node, "load() takes one checkpoint tensor name", w.origin)
                continue
            parts = []
            for a in w.init_args:
                if not is_weight(a) or a not in self.weights:
                    self.add("weights.derived-from-declared", node, f"{w.init_fn}() names undeclared weight {a}", w.origin)
                else:
                    parts.append(self.weights[a].type)
            if w.name in malformed or malformed.intersection(w.init_args):
                continue
            if w.init_fn == "concat" and len(parts) == len(w.init_args) and parts:
                axis = w.init_attrs.get("axis", 0)
                ok = all(p.rank == w.type.rank for p in parts) and _int(axis) and 0 <= axis < w.type.rank
                if ok:
                    want = list(parts[0].shape)
                    want[axis] = sum(p.shape[axis] for p in parts)
                    ok = all(p.shape[:axis] + p.shape[axis + 1:] == parts[0].shape[:axis] + parts[0].shape[axis + 1:] for p in parts) \
                        and tuple(want) == w.type.shape and all(p.dtype == w.type.dtype for p in parts)
                if not ok:
                    self.add("weights.concat-shape", node, f"concat of {', '.join(map(str, parts))} on axis {axis} is not {w.type}", w.origin)
            elif w.init_fn in WEIGHT_INIT_RULES:
                if len(parts) == len(w.init_args):
                    problem = WEIGHT_INIT_RULES[w.init_fn](parts, w.init_attrs, w.type)
                    if problem:
                        self.add("weights.derived-type", node, f"{w.init_fn}(): {problem}", w.origin)
            elif w.init_fn not in ("concat",):
                if w.init_fn not in DERIVED_WEIGHT_FNS:
                    self.add("weights.known-init", node, f"unknown weight init '{w.init_fn}' (known: load, {', '.join(sorted(DERIVED_WEIGHT_FNS))})", w.origin)
        self.check_packed_weights()

    def check_packed_weights(self) -> None:
        """A oneDNN-packed weight has an opaque layout: only torch.linear_onednn reads it,
        and no other weight is derived from it (a fusion after pack-linear-weights would
        concatenate packed tensors)."""
        packed = {w.name for w in self.m.model.weights if w.init_fn == "onednn_pack"}
        if not packed:
            return
        for w in self.m.model.weights:
            for a in w.init_args:
                if a in packed:
                    self.add("weights.packed-not-derived", f"weight {w.name}", f"{w.init_fn}() reads the packed weight {a} "
                                                             "(run pack-linear-weights after the fusions)", w.origin)
        for op in walk_ops(self.m.model.func.body):
            reads = [o for o in op.operands if o in packed]
            if reads and (op.kind != "linear" or op.kernel is None or op.kernel.name != "torch.linear_onednn"):
                self.add("weights.packed-onednn-only", f"op {op.kind}", f"reads the packed weight {reads[0]} but is not a linear "
                                                      f"via torch.linear_onednn", op.origin)

    def check_function(self) -> None:
        f = self.m.model.func
        symbols = set(f.symbols)
        scope: dict[str, TensorType] = {}
        for name, t in f.params:
            self.define(scope, name, t, f"param {name}", self.m.model.origin)
            self.check_type_symbols(t, symbols, f"param {name}", self.m.model.origin)
        self.check_ops(f.body, scope, symbols, in_region=False, where="step")
        undefined = [r for r in f.returns if r not in scope]
        for r in undefined:
            self.add("ssa.returns-defined", "return", f"returns undefined value {r}", self.m.model.origin)
        if not undefined:       # else their types are unknown: model.step-returns would only repeat it
            self.check_returns(scope)

    def check_returns(self, scope: dict[str, TensorType]) -> None:
        f = self.m.model.func
        rets = [scope.get(r) for r in f.returns]
        vocab = self.m.model.attrs.get("vocab")
        ok = len(rets) == 2 and rets[0] is not None and rets[1] is not None \
            and rets[0].dtype in FLOAT_DTYPES and rets[0].shape == ("B", vocab) \
            and rets[1].dtype == "i64" and rets[1].shape == ("B",)
        if not ok:
            got = ", ".join(str(t) for t in rets)
            self.add("model.step-returns", "return", f"step must return (logits f32[B, {vocab}], tokens i64[B]), got ({got})", self.m.model.origin)

    def define(self, scope, name, t, node, origin) -> None:
        if name in scope:
            self.add("ssa.defined-once", node, f"value {name} is defined twice", origin)
        scope[name] = t

    def check_type_symbols(self, t: TensorType, symbols: set[str], node: str, origin: Origin) -> None:
        if t.dtype not in KNOWN_DTYPES:
            self.add("types.known-dtype", node, f"unknown dtype '{t.dtype}'", origin)
        for d in t.shape:
            if isinstance(d, str) and d not in symbols:
                self.add("types.declared-symbols", node, f"shape {t} uses undeclared symbol '{d}'", origin)

    def operand_type(self, operand: str, scope, in_region: bool, node: str, origin: Origin, op: Op) -> TensorType | None:
        if is_weight(operand):
            w = self.weights.get(operand)
            if w is None:
                self.add("weights.operands-declared", node, f"uses undeclared weight {operand}", origin)
                return None
            tvars = set(_TEMPLATE_VARS.findall(operand))
            if "i" in tvars and not in_region:
                self.add("weights.layer-in-region", node, f"per-layer weight {operand} used outside a repeat region", origin)
            if "e" in tvars and op.kind != "moe":
                self.add("weights.expert-in-moe", node, f"per-expert weight {operand} used by a non-expert op", origin)
            return w.type
        if operand not in scope:
            self.add("ssa.def-before-use", node, f"uses {operand} before it is defined", origin)
            return None
        return scope[operand]

    def check_ops(self, ops: list[Op], scope: dict[str, TensorType], symbols: set[str], in_region: bool, where: str) -> None:
        for op in ops:
            label = ", ".join(op.results) or "(no result)"
            node = f"op {label} = {op.kind} in {where}"
            if op.kind not in OPS:
                self.add("types.known-op", node, f"unknown op kind '{op.kind}' (known: {', '.join(sorted(OPS))})", op.origin)
                for r, t in zip(op.results, op.types):
                    self.define(scope, r, t, node, op.origin)
                continue
            arity = operand_arity_ok(op.kind, op.operands)
            if arity:
                self.add("types.arity", node, arity, op.origin)
            operand_types = [self.operand_type(o, scope, in_region, node, op.origin, op) for o in op.operands]
            self.check_kernel(op, node)
            # What its users see: the types its operands give where they differ from the declared
            # ones (reported here once, not again at every user)
            result_types = list(op.types)
            if op.kind == "repeat":
                result_types = self.check_repeat(op, operand_types, scope, symbols, node) or result_types
            elif not arity and all(t is not None and t.dtype in KNOWN_DTYPES for t in operand_types):
                # (an operand of unknown dtype or undefined is already reported: its users are not checked)
                try:
                    inferred = infer(op.kind, operand_types, op.attrs)
                    if len(op.types) == len(inferred):
                        result_types = inferred
                    if op.types != inferred:
                        self.add("types.inferred", node, f"declares ({', '.join(map(str, op.types))}) but its operands give "
                                                f"({', '.join(map(str, inferred))})", op.origin)
                except TypeRuleError as e:
                    self.add("types.op-rule", node, str(e), op.origin)
            if len(op.types) != len(op.results):
                self.add("types.result-count", node, f"{len(op.results)} results but {len(op.types)} types", op.origin)
            for t in op.types:
                self.check_type_symbols(t, symbols, node, op.origin)
            for r, t in zip(op.results, result_types):
                self.define(scope, r, t, node, op.origin)

    def check_repeat(self, op: Op, operand_types, scope, symbols, node: str) -> list[TensorType] | None:
        """Checks a repeat op; returns the types its loop carries (None without a region)."""
        if op.region is None:
            self.add("types.repeat-region", node, "repeat has no region", op.origin)
            return None
        count = op.attrs.get("count")
        layers = self.m.model.attrs.get("layers")
        if count != layers:
            self.add("model.layer-count", node, f"repeats {count} times but the model has {layers} layers", op.origin)
        region = op.region
        arg_types = [t for _, t in region.args]
        if arg_types != operand_types or len(region.args) != len(op.operands):
            self.add("types.region-args", node, "region arguments do not match the repeat operands", op.origin)
        inner = dict(scope)  # the region sees outer values defined before it
        for name, t in region.args:
            if name in scope:
                self.add("ssa.region-no-shadowing", node, f"region argument {name} shadows an outer value", op.origin)
            inner[name] = t
        self.check_ops(region.ops, inner, symbols, in_region=True, where="layer region")
        yield_types = []
        for y in region.yields:
            if y not in inner:
                self.add("ssa.yields-defined", node, f"region yields undefined value {y}", op.origin)
            yield_types.append(inner.get(y))
        if None not in yield_types and yield_types != arg_types:
            self.add("types.loop-carried", node, f"region yields ({', '.join(map(str, yield_types))}) but its arguments are "
                                    f"({', '.join(map(str, arg_types))}): the loop must carry one type around", op.origin)
        if op.types != arg_types:
            self.add("types.repeat-results", node, "repeat result types differ from its region's carried types", op.origin)
        return arg_types

    def check_kernel(self, op: Op, node: str) -> None:
        structural = OPS[op.kind].structural
        if structural:
            if op.kernel is not None:
                self.add("kernels.control-none", node, f"control op '{op.kind}' must not name a kernel", op.origin)
            return
        if op.kernel is None:
            self.add("kernels.present", node, "has no kernel", op.origin)
            return
        info = KERNELS.get(op.kernel.name)
        if info is None:
            self.add("kernels.known", node, f"unknown kernel '{op.kernel.name}'", op.origin)
            return
        if op.kind not in info.ops:
            self.add("kernels.implements-op", node, f"kernel {info.name} implements {', '.join(sorted(info.ops))}, not {op.kind}", op.origin)
        if self.m.target.kind in TARGET_KINDS and self.m.target.kind not in info.targets:
            self.add("kernels.runs-on-target", node, f"kernel {info.name} does not run on target {self.m.target.kind}", op.origin)
        if "native" in op.attrs:
            self.add("kernels.no-native", node, "attribute 'native' asks for the C++ decode kernel, which was removed "
                                      "(tvm.paged_attention measured faster); drop it and run select-kernels", op.origin)
        if self.m.cache.layout in KV_CACHE_LAYOUTS and self.m.cache.layout not in info.cache_layouts:
            self.add("kernels.cache-layout", node, f"kernel {info.name} needs a {'/'.join(sorted(info.cache_layouts))} cache, "
                                      f"the plan's is {self.m.cache.layout}", op.origin)
        if self.m.cache.dtype in CACHE_DTYPES and self.m.cache.dtype not in info.cache_dtypes:
            self.add("kernels.cache-dtype", node, f"kernel {info.name} reads a {'/'.join(sorted(info.cache_dtypes))} KV cache, "
                                      f"the plan's is {self.m.cache.dtype}", op.origin)
        computed = next((t.dtype for t in op.types if t.dtype in FLOAT_DTYPES), None)
        if computed is not None and computed not in info.dtypes:
            self.add("kernels.compute-dtype", node, f"kernel {info.name} computes in {'/'.join(sorted(info.dtypes))}, this op in "
                                      f"{computed}", op.origin)
        operand = op.operands[1] if len(op.operands) > 1 else ""
        w = self.weights.get(operand) if is_weight(operand) else None
        if w is not None and w.type.dtype not in info.weight_dtypes:
            fits = sorted(k.name for k in KERNELS.values() if op.kind in k.ops and w.type.dtype in k.weight_dtypes)
            self.add("kernels.weight-dtype", node, f"kernel {info.name} does not read {w.type.dtype} weights ({operand}); "
                                      f"kernels for {op.kind} that do: {', '.join(fits) or 'none'}", op.origin)

    # -- the other concerns --------------------------------------------------
    def check_target(self) -> None:
        t = self.m.target
        node = f"target {t.kind}"
        if t.kind not in TARGET_KINDS:
            self.add("target.kind", node, f"target kind must be one of {', '.join(TARGET_KINDS)}", t.origin)
        if t.kind == "cuda" and not re.fullmatch(r"sm_\d{2,3}a?", str(t.attrs.get("arch", ""))):
            self.add("target.cuda-arch", node, f"cuda arch {t.attrs.get('arch')!r} is not of the form sm_NN", t.origin)
        threads = t.attrs.get("threads", 0)
        if not isinstance(threads, int) or threads < 0:
            self.add("target.threads", node, f"threads must be a non-negative int, got {threads!r}", t.origin)
        intra = self.m.schedule.attrs.get("intra_op_threads")
        if intra is not None:
            if t.kind != "cpu":
                self.add("target.intra-op-cpu", "schedule", f"intra_op_threads is for cpu targets, this one is {t.kind}",
                         self.m.schedule.origin)
            elif not isinstance(intra, int) or intra < 1 or (isinstance(threads, int) and 0 < threads < intra):
                self.add("target.intra-op-range", "schedule", f"intra_op_threads must be an int in 1..{threads or 'cores'}, "
                                               f"got {intra!r}", self.m.schedule.origin)
        graph = self.m.schedule.attrs.get("graph", "eager")
        if graph not in GRAPH_FORMS:
            self.add("target.graph-form", "schedule", f"graph must be one of {', '.join(GRAPH_FORMS)}, got {graph!r}",
                     self.m.schedule.origin)
        elif graph == "relax":
            for why in decode_step_blockers(self.m):
                self.add("target.relax-compiles", "schedule", f"graph = relax: {why}", self.m.schedule.origin)
        memory = t.attrs.get("memory")
        if not isinstance(memory, int) or memory <= 0:
            self.add("target.memory", node, f"memory must be a positive number of bytes, got {memory!r}", t.origin)

    def max_context(self) -> int | None:
        """The deployment's max_context (0 when absent); None when it is not a positive int
        (reported once, by check_deployment), so no check compares against it."""
        v = self.m.deployment.get("max_context", 0)
        return v if _int(v) and v >= 0 else None

    def check_deployment(self) -> None:
        v = self.m.deployment.get("max_context")
        if v is not None and not (_int(v) and v > 0):
            self.add("cache.max-context", "deployment", f"max_context must be a positive int, got {v!r}", self.m.origin)

    def check_cache(self) -> None:
        c, a = self.m.cache, self.m.model.attrs
        node = "cache"
        max_context = self.max_context()
        if c.layout not in KV_CACHE_LAYOUTS:
            self.add("cache.layout", node, f"layout must be one of {', '.join(KV_CACHE_LAYOUTS)}, got {c.layout!r}", c.origin)
        if c.dtype not in CACHE_DTYPES:
            self.add("cache.dtype", node, f"unknown cache dtype {c.dtype!r} (known: {', '.join(sorted(CACHE_DTYPES))})", c.origin)
            return
        if c.block_size < 1 or (c.layout == "contiguous" and max_context is not None and c.block_size != max_context):
            why = f" (a contiguous cache has one max_context = {max_context} block per slot)" if c.layout == "contiguous" else ""
            self.add("cache.block-size", node, f"block_size {c.block_size} is invalid for a {c.layout} cache{why}", c.origin)
        elif c.capacity_tokens % c.block_size:
            self.add("cache.whole-blocks", node, f"capacity {c.capacity_tokens} is not a whole number of {c.block_size}-token blocks", c.origin)
        if any(not isinstance(a.get(k), int) for k in ("layers", "kv_heads", "head_dim")):
            self.add("model.kv-attrs", "model", "model attributes must give int layers, kv_heads and head_dim", self.m.model.origin)
            return
        per_token = kv_bytes_per_token(a, c.dtype)
        if c.capacity_tokens * per_token > c.budget_bytes:
            self.add("cache.budget", node, f"{c.capacity_tokens} tokens x {per_token} B = {c.capacity_tokens * per_token} B "
                                    f"exceeds the budget of {c.budget_bytes} B", c.origin)
        need = (max_context or 0) * (self.m.batching.max_batch if c.layout == "contiguous" else 1)
        if c.capacity_tokens < need:
            self.add("cache.holds-context", node, f"capacity {c.capacity_tokens} tokens cannot hold {need} "
                                    f"({'max_batch x ' if c.layout == 'contiguous' else ''}max_context)", c.origin)
        if c.prefix_sharing not in PREFIX_CACHE_POLICIES:
            self.add("cache.prefix-sharing", node, f"prefix_sharing must be one of {', '.join(PREFIX_CACHE_POLICIES)}, "
                                    f"got {c.prefix_sharing!r}", c.origin)
        elif c.prefix_sharing != "none" and c.layout != "paged":
            self.add("cache.prefix-sharing-paged", node, "prefix sharing needs a paged cache", c.origin)
        if c.eviction not in EVICTION_POLICIES:
            self.add("cache.eviction", node, f"eviction must be one of {', '.join(EVICTION_POLICIES)}, got {c.eviction!r}", c.origin)

    def check_batching(self) -> None:
        b = self.m.batching
        node = "batching"
        max_context = self.max_context() or 0
        for field_name, allowed in (("mode", BATCHING_MODES), ("order", SCHEDULING_ORDERS),
                                    ("preemption", PREEMPTION_POLICIES)):
            if getattr(b, field_name) not in allowed:
                self.add(f"batching.{field_name}", node, f"{field_name} must be one of {', '.join(allowed)}, got {getattr(b, field_name)!r}", b.origin)
        if b.max_batch < 1:
            self.add("batching.max-batch", node, f"max_batch must be >= 1, got {b.max_batch}", b.origin)
        if b.max_tokens < b.max_batch:
            self.add("batching.decode-fits", node, f"max_tokens {b.max_tokens} is below max_batch {b.max_batch}: a decode step could not fit", b.origin)
        if b.chunked_prefill == 0 and b.max_tokens < max_context:
            self.add("batching.prefill-fits", node, f"max_tokens {b.max_tokens} cannot prefill a {max_context}-token prompt without chunked prefill", b.origin)
        if b.chunked_prefill < 0 or b.chunked_prefill > b.max_tokens:
            self.add("batching.chunk-range", node, f"chunked_prefill {b.chunked_prefill} must be 0 (off) or within max_tokens {b.max_tokens}", b.origin)
        if b.chunked_prefill and b.mode != "continuous":
            self.add("batching.chunk-continuous", node, "chunked prefill needs continuous batching", b.origin)
        prefill = self.m.requests.stage("prefill")
        target = prefill.attrs.get("tpot_slo_ms") if prefill is not None else None
        if target is not None:
            if isinstance(target, bool) or not isinstance(target, (int, float)) or not target > 0:
                self.add("requests.tpot-slo", "stage prefill", f"tpot_slo_ms must be a positive number of ms, got {target!r}",
                         prefill.origin)
            elif not b.chunked_prefill:
                self.add("requests.tpot-needs-chunking", "stage prefill", "tpot_slo_ms caps chunked prefill; the plan has none "
                                                      "(chunked-prefill{slo=true} sets both)", prefill.origin)

    def check_requests(self) -> None:
        g = self.m.requests.graph
        origin = self.m.origin
        for stage in self.m.requests.stages():
            if stage.name not in KNOWN_STAGES:
                self.add("requests.known-stages", f"stage {stage.name}", f"unknown stage kind (known: {', '.join(sorted(KNOWN_STAGES))})", stage.origin)
        if g.number_of_nodes() == 0:
            self.add("requests.nonempty", "requests", "request graph is empty", origin)
            return
        if not nx.is_directed_acyclic_graph(g):
            cycle = " -> ".join(u for u, _ in nx.find_cycle(g))
            self.add("requests.acyclic", "requests", f"request graph has a cycle: {cycle}", origin)
        if not nx.is_weakly_connected(g):
            parts = [sorted(c) for c in nx.weakly_connected_components(g)]
            self.add("requests.connected", "requests", f"request graph is not connected: {parts}", origin)
        sources = sorted(n for n in g if g.in_degree(n) == 0)
        sinks = sorted(n for n in g if g.out_degree(n) == 0)
        if sources != ["ingress"]:
            self.add("requests.entry-ingress", "requests", f"the only entry must be ingress, found {sources}", origin)
        if sinks != ["stream"]:
            self.add("requests.exit-stream", "requests", f"the only exit must be stream, found {sinks}", origin)
        if "prefill" in g and "decode" in g and not nx.has_path(g, "prefill", "decode"):
            self.add("requests.prefill-before-decode", "requests", "decode is not reachable from prefill", origin)
        constrain = self.m.requests.stage("constrain")
        if constrain is not None:
            for rule, problem in _constrain_problems(constrain.attrs, g):
                self.add(rule, "stage constrain", problem, constrain.origin)
        admit = self.m.requests.stage("admit")
        if admit is not None:
            for rule, problem in _admission_problems(admit.attrs):
                self.add(rule, "stage admit", problem, admit.origin)
        for rule, problem in _route_problems(self.m.deployment.get("replicas"), self.m.requests.stage("route"), g):
            self.add(rule, "stage route", problem, origin)
        draft, verify_stage = self.m.requests.stage("draft"), self.m.requests.stage("verify")
        if draft is not None or verify_stage is not None:
            for rule, problem in _speculative_problems(draft, verify_stage, g, self.m.cache.layout):
                self.add(rule, "stage draft", problem, (draft or verify_stage).origin)

    def run(self) -> list[Diagnostic]:
        self.check_weights()
        self.check_function()
        self.check_target()
        self.check_deployment()
        self.check_cache()
        self.check_batching()
        self.check_requests()
        return self.diags


def _admission_problems(attrs: dict) -> list[tuple[str, str]]:
    """What is wrong with the `admit` stage's overload policy (absent: queue, as before it existed)."""
    policy = attrs.get("overload")
    if policy is None:
        return []
    if policy not in OVERLOAD_POLICIES:
        return [("requests.overload-policy", f"overload must be one of {', '.join(OVERLOAD_POLICIES)}, got {policy!r}")]
    target = attrs.get("ttft_slo_ms")
    if policy == "shed" and (isinstance(target, bool) or not isinstance(target, (int, float)) or not target > 0):
        return [("requests.shed-slo", f"overload = shed needs ttft_slo_ms, a positive number of ms (the TTFT objective), got {target!r}")]
    return []


def _route_problems(replicas, route, g: nx.DiGraph) -> list[tuple[str, str]]:
    """What is wrong with the plan's scale-out (vsc.ir.route): its replica count and its route stage."""
    if replicas is not None and not (_int(replicas) and replicas >= 1):
        return [("requests.replicas", f"replicas must be an int >= 1, got {replicas!r}")]
    many = replicas is not None and replicas > 1
    if many != (route is not None):
        return [("requests.route-replicas", f"{replicas or 1} replica(s) and {'a' if route else 'no'} route stage: "
                                            "a route stage comes with replicas > 1 (vsc.ir.route.add_route)")]
    if route is None:
        return []
    problems = []
    if sorted(g.successors("route")) != ["admit"] or sorted(g.predecessors("route")) != ["tokenize"]:
        problems.append(("requests.route-feeds-admit", f"must sit between tokenize and admit, follows "
                                                       f"{sorted(g.predecessors('route'))} and feeds {sorted(g.successors('route'))}"))
    a = route.attrs
    if a.get("policy") not in ROUTER_POLICIES:
        problems.append(("requests.route-policy", f"policy must be one of {', '.join(ROUTER_POLICIES)}, got {a.get('policy')!r}"))
    blocks, target = a.get("prefix_blocks"), a.get("ttft_slo_ms")
    bad_blocks = a.get("policy") == "prefix_affinity" and not (_int(blocks) and blocks >= 1)
    bad_target = target is not None and (isinstance(target, bool) or not isinstance(target, (int, float)) or not target > 0)
    if bad_blocks or bad_target:
        problems.append(("requests.route-params", f"prefix_blocks {blocks!r} must be an int >= 1 (prefix_affinity) and "
                                                  f"ttft_slo_ms {target!r} a positive number of ms when set"))
    return problems


def _constrain_problems(attrs: dict, g: nx.DiGraph) -> list[tuple[str, str]]:
    """What is wrong with a `constrain` stage (json-mode): where it sits and what it carries."""
    problems = []
    if sorted(g.successors("constrain")) != ["sample"]:
        problems.append(("requests.constrain-feeds-sample", f"must feed exactly the sample stage, feeds {sorted(g.successors('constrain'))}"))
    if "decode" in g and not nx.has_path(g, "decode", "constrain"):
        problems.append(("requests.constrain-after-decode", "is not reachable from decode"))
    if attrs.get("grammar") not in CONSTRAIN_GRAMMARS:
        problems.append(("requests.constrain-grammar", f"grammar must be {' or '.join(map(json.dumps, CONSTRAIN_GRAMMARS))}, "
                                                       f"got {attrs.get('grammar')!r}"))
    schema = attrs.get("schema")
    try:
        parsed = json.loads(schema) if isinstance(schema, str) else None
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        problems.append(("requests.constrain-schema", "schema must be the text of a JSON object (a JSON Schema)"))
    elif attrs.get("sha256") != hashlib.sha256(schema.encode("utf-8", "surrogatepass")).hexdigest():
        problems.append(("requests.constrain-sha256", "sha256 does not match the schema text"))
    return problems


def _speculative_problems(draft, verify_stage, g: nx.DiGraph, layout: str) -> list[tuple[str, str]]:
    """What is wrong with speculative decoding's `draft` / `verify` stages: where they sit
    (decode -> draft -> verify -> ... -> sample) and what they carry."""
    if draft is None or verify_stage is None:
        return [("requests.speculative-pair", "draft and verify stages come together (speculative decoding)")]
    problems = []
    if sorted(g.successors("draft")) != ["verify"]:
        problems.append(("requests.draft-feeds-verify", f"must feed exactly the verify stage, feeds {sorted(g.successors('draft'))}"))
    if "decode" in g and not nx.has_path(g, "decode", "draft"):
        problems.append(("requests.draft-after-decode", "is not reachable from decode"))
    if "sample" in g and not nx.has_path(g, "verify", "sample"):
        problems.append(("requests.verify-to-sample", "verify does not lead to sample"))
    a = draft.attrs
    method, k = a.get("method"), a.get("k")
    if method not in SPECULATIVE_METHODS:
        problems.append(("requests.draft-method", f"method must be one of {', '.join(SPECULATIVE_METHODS)}, got {method!r}"))
    if not isinstance(k, int) or k < 1:
        problems.append(("requests.draft-k", f"k must be an integer >= 1, got {k!r}"))
    elif verify_stage.attrs.get("tokens") != k + 1:
        problems.append(("requests.verify-tokens", f"verify must check k + 1 = {k + 1} tokens, says {verify_stage.attrs.get('tokens')!r}"))
    if method in NGRAM_SPECULATIVE_METHODS and not (isinstance(a.get("ngram"), int) and a["ngram"] >= 1):
        problems.append(("requests.draft-ngram", f"ngram must be an integer >= 1, got {a.get('ngram')!r}"))
    if method == "draft" and not (isinstance(a.get("model"), str) and a["model"]):
        problems.append(("requests.draft-model", "method draft needs the draft model's folder (model)"))
    if layout != "paged":
        problems.append(("requests.speculative-paged", "speculative decoding needs a paged KV cache"))
    return problems


# Weight derivations a pass may introduce besides concat (materialized by the backend).
# (Those with a typing rule are listed in vsc/ir/weight_inits.py.)
DERIVED_WEIGHT_FNS = {"concat", "transpose"} | set(WEIGHT_INIT_RULES)


def rules_by_group() -> dict[str, list[str]]:
    """INVARIANTS' groups, each with its RULES in declaration order (what `vsc verify --list` prints)."""
    return {group: [r for r in RULES if r.split(".")[0] == group] for group in INVARIANTS}


def verify(module: ServingModule) -> list[Diagnostic]:
    """All invariant violations in `module` (empty list when it is valid)."""
    return _Checker(module).run()


def verify_or_raise(module: ServingModule) -> None:
    diags = verify(module)
    if diags:
        raise VerificationError(diags)
