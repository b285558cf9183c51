"""Meaning of the spec language: checked items -> the DeploymentSpec AST.

`Checker` walks the items of `vsc.frontend.syntax` against the tables of
`vsc.frontend.schema`: which names may appear, in which shape, with which values and
units. Every mistake is a SpecError at the line:column of the offending token; nothing
else escapes. Paths in the spec (the model, the dataset) are relative to the spec file's
folder; the model itself is read by `vsc.frontend.model_folder`.
"""
from __future__ import annotations

from pathlib import Path

from vsc.errors import ModelError, SourceLocation, SpecError
from vsc.frontend import units
from vsc.frontend.diagnostics import suggest
from vsc.frontend.model_folder import read_model_config
from vsc.frontend.schema import (
    ACCURACY_CHECKS,
    APIS,
    ARCH_RE,
    ARRIVALS,
    DEFAULT_DTYPE,
    DEPLOYMENT_SECTIONS,
    DISTRIBUTIONS,
    DTYPES,
    MODEL_KEYS,
    PERCENTILES,
    QUANTITY_EXAMPLES,
    REQUIRED_SECTIONS,
    REQUIRED_WORKLOAD,
    SERVE_KEYS,
    SHARED_PREFIX_KEYS,
    SLO_METRICS,
    TARGET_ALIASES,
    TARGET_KEYS,
    WORKLOAD_KEYS,
    WORKLOAD_KINDS,
    Field,
)
from vsc.frontend.spec import (
    AccuracySpec,
    ArrivalSpec,
    DeploymentSpec,
    Distribution,
    ModelSpec,
    OptimizeSpec,
    ServeSpec,
    SharedPrefixSpec,
    SLOSpec,
    TargetSpec,
    WorkloadSpec,
)
from vsc.frontend.syntax import (
    SHAPES,
    Call,
    CallItem,
    Compare,
    Flag,
    Ident,
    Item,
    Number,
    Quantity,
    Section,
    String,
    Value,
)
from vsc.runtime.enums import OVERLOAD_POLICIES, ROUTER_POLICIES


def check(text: str, file: Path, items: list[Item]) -> DeploymentSpec:
    """The DeploymentSpec that `items` (parsed from `text`, the spec at `file`) describe."""
    return Checker(text, file, items).deployment()


def describe_value(v: Value) -> str:
    if isinstance(v, Number):
        return f"'{v.text}'"
    if isinstance(v, Quantity):
        return f"'{v.text}'"
    if isinstance(v, String):
        return f"string {v.text}"
    if isinstance(v, Ident):
        return f"'{v.name}'"
    return f"call '{v.name}(...)'"


class Checker:
    """Checks the items of one spec against the schema and builds the AST."""

    def __init__(self, text: str, file: Path, items: list[Item]):
        self.text = text
        self.file_name = str(file)
        self.file = file.resolve()
        self.base = self.file.parent
        self.items = items
        self.model_config: dict = {}

    # -- helpers ---------------------------------------------------------------

    def error(self, message: str, loc: SourceLocation) -> SpecError:
        return SpecError(message, loc, self.text)

    def fields(self, items: list[Item], where: str, schema: dict[str, Field],
               other: dict[str, str] | None = None) -> dict[str, Item]:
        """Index `items` by name; unknown names, wrong shapes and duplicates are errors.

        `other` maps names that are valid elsewhere to why they are not valid here.
        """
        seen: dict[str, Item] = {}
        for item in items:
            name = item.name
            shape = SHAPES[type(item)]
            if name not in schema:
                if other and name in other:
                    raise self.error(other[name], item.loc)
                word = "section" if shape == "section" else "key"
                raise self.error(f"unknown {word} '{name}' in {where}{suggest(name, schema)}", item.loc)
            expected = schema[name]
            if not isinstance(item, expected.shape):
                raise self.error(f"'{name}' is written '{expected.usage}'", item.loc)
            if name in seen:
                word = "section" if shape == "section" else "key"
                first = seen[name].loc.line
                raise self.error(f"duplicate {word} '{name}' in {where} (first given on line {first})", item.loc)
            seen[name] = item
        return seen

    def block_only(self, sec: Section, usage: str) -> list[Item]:
        """The body of a section that takes no argument."""
        if sec.arg is not None:
            raise self.error(f"'{sec.name}' takes no argument: write '{usage}'", sec.arg.loc)
        if sec.body is None:
            raise self.error(f"'{sec.name}' needs a block: write '{usage}'", sec.loc)
        return sec.body

    def number(self, v: Value, what: str) -> int | float:
        if isinstance(v, Quantity):
            raise self.error(f"{what} is a plain number, without a unit (got '{v.text}')", v.loc)
        if not isinstance(v, Number):
            raise self.error(f"{what} must be a number, got {describe_value(v)}", v.loc)
        return v.value

    def whole(self, v: Value, what: str) -> int:
        """A positive whole number (`4`, or `4.0` / `1e2` when they are whole)."""
        n = self.number(v, what)
        if isinstance(n, float):
            if not n.is_integer():
                raise self.error(f"{what} must be a whole number, got '{v.text}'", v.loc)
            n = int(n)
        if n < 1:
            raise self.error(f"{what} must be a positive whole number, got '{v.text}'", v.loc)
        return n

    def positive(self, v: Value, what: str, allow_zero: bool = False) -> float:
        n = self.number(v, what)
        if n < 0 or (n == 0 and not allow_zero):
            need = "zero or more" if allow_zero else "positive"
            raise self.error(f"{what} must be {need}, got '{v.text}'", v.loc)
        return float(n)

    def quantity(self, v: Value, what: str, kind: str) -> int | float:
        if isinstance(v, Number):
            raise self.error(
                f"{what} needs a unit: '{v.text}' is not {units.KIND_NOUNS[kind]} "
                f"(use {units.describe_units(kind)})", v.loc)
        if not isinstance(v, Quantity):
            raise self.error(f"{what} must be {units.KIND_NOUNS[kind]} such as '{QUANTITY_EXAMPLES[kind]}', "
                             f"got {describe_value(v)}", v.loc)
        try:
            value = units.convert(v.value, v.unit, kind, v.number_text)
        except units.UnitError as e:
            raise self.error(str(e), v.loc) from None
        if value <= 0:
            raise self.error(f"{what} must be positive, got '{v.text}'", v.loc)
        return value

    def word(self, v: Value, what: str) -> str:
        """A name written bare or in quotes (`f32` or `"f32"`)."""
        if isinstance(v, Ident):
            return v.name
        if isinstance(v, String):
            return v.value
        raise self.error(f"{what} must be a name, got {describe_value(v)}", v.loc)

    def choice(self, v: Value, what: str, known, hint: str, noun: str | None = None) -> str:
        """A name (see `word`) that must be one of `known`: "unknown {noun} 'x' ({hint})" if not."""
        word = self.word(v, what)
        if word not in known:
            raise self.error(f"unknown {noun or what} '{word}' ({hint})", v.loc)
        return word

    def string(self, v: Value, what: str) -> str:
        if not isinstance(v, String):
            raise self.error(f"{what} must be a string in double quotes, got {describe_value(v)}", v.loc)
        return v.value

    def bind(self, call: Call, params: tuple[str, ...], required: int) -> dict[str, Value]:
        """Match a call's arguments to parameter names (positional or `name = value`)."""
        sig = f"{call.name}({', '.join(params)})"
        if len(call.args) > len(params):
            extra = call.args[len(params)]
            raise self.error(f"too many arguments to {call.name}: expected {sig}", extra.loc)
        bound: dict[str, Value] = dict(zip(params, call.args))
        for kw in call.kwargs:
            if kw.name not in params:
                raise self.error(f"unknown argument '{kw.name}' to {call.name}{suggest(kw.name, params)}"
                                 f": expected {sig}", kw.loc)
            if kw.name in bound:
                raise self.error(f"argument '{kw.name}' given twice to {call.name}", kw.loc)
            bound[kw.name] = kw.value
        for p in params[:required]:
            if p not in bound:
                raise self.error(f"{call.name} is missing '{p}': expected {sig}", call.loc)
        return bound

    def call(self, v: Value, what: str, known: dict, example: str) -> Call:
        if not isinstance(v, Call):
            raise self.error(f"{what} must be one of {', '.join(f'{k}(...)' for k in known)} "
                             f"(e.g. {example}), got {describe_value(v)}", v.loc)
        if v.name not in known:
            raise self.error(f"unknown {what} '{v.name}'{suggest(v.name, known)}; "
                             f"use {', '.join(known)}", v.loc)
        return v

    def local_path(self, s: String) -> Path:
        p = Path(s.value).expanduser() if s.value.startswith("~") else Path(s.value)
        return (p if p.is_absolute() else self.base / p).resolve()

    # -- deployment ------------------------------------------------------------

    def deployment(self) -> DeploymentSpec:
        if not self.items:
            loc = SourceLocation(self.file_name, 1, 1)
            raise self.error("empty spec: expected 'deployment <name> { ... }'", loc)
        first = self.items[0]
        if not isinstance(first, Section) or first.name != "deployment":
            raise self.error(f"expected 'deployment <name> {{ ... }}' but found '{first.name}'"
                             f"{suggest(first.name, ['deployment'])}", first.loc)
        if len(self.items) > 1:
            raise self.error("only one deployment per file; this spec already has one "
                             f"(line {first.loc.line})", self.items[1].loc)
        dep = first
        if dep.arg is None:
            raise self.error("the deployment needs a name: 'deployment <name> { ... }'", dep.loc)
        name = self.word(dep.arg, "the deployment name")
        if dep.body is None:
            raise self.error(f"deployment '{name}' needs a block: 'deployment {name} {{ ... }}'", dep.loc)
        sections = self.fields(dep.body, "deployment", DEPLOYMENT_SECTIONS)
        for req in REQUIRED_SECTIONS:
            if req not in sections:
                raise self.error(f"deployment '{name}' is missing the '{req}' section "
                                 f"(e.g. '{DEPLOYMENT_SECTIONS[req].usage}')", dep.loc)

        target = self.target(sections["target"])
        model = self.model(sections["model"], target)
        workload = self.workload(sections["workload"])
        spec = DeploymentSpec(
            name=name,
            file=self.file,
            model=model,
            target=target,
            workload=workload,
            loc=dep.loc,
        )
        if "slo" in sections:
            spec.slos = self.slos(sections["slo"])
        if "accuracy" in sections:
            spec.accuracy = self.accuracy(sections["accuracy"])
        if "serve" in sections:
            spec.serve = self.serve(sections["serve"], spec.slos)
        if "optimize" in sections:
            spec.optimize = self.optimize(sections["optimize"])
        return spec

    # -- model -----------------------------------------------------------------

    def model(self, sec: Section, target: TargetSpec) -> ModelSpec:
        usage = DEPLOYMENT_SECTIONS["model"].usage
        if sec.arg is None:
            raise self.error(f"model needs the path of a model folder: write '{usage}'", sec.loc)
        if not isinstance(sec.arg, String):
            raise self.error(f"the model path must be a string in double quotes, e.g. '{usage}'", sec.arg.loc)
        path = self.check_model_folder(sec.arg)
        keys = self.fields(sec.body or [], "model", MODEL_KEYS)
        dtype = DEFAULT_DTYPE[target.kind]
        if "dtype" in keys:
            dtype = DTYPES[self.choice(keys["dtype"].value, "dtype", DTYPES, "use f32, bf16 or f16")]
        return ModelSpec(path=path, dtype=dtype, loc=sec.loc)

    def check_model_folder(self, arg: String) -> Path:
        try:
            path = self.local_path(arg)
            self.model_config = read_model_config(path, arg.value)
        except ModelError as e:
            raise self.error(e.message, arg.loc) from None
        except (OSError, ValueError, RuntimeError):
            raise self.error(f"model path '{arg.value}' is not a usable path", arg.loc) from None
        return path

    # -- target ----------------------------------------------------------------

    def target(self, sec: Section) -> TargetSpec:
        if sec.arg is None:
            raise self.error("target needs a kind: 'target cpu { ... }' or 'target cuda { ... }'", sec.loc)
        kind = self.word(sec.arg, "the target kind")
        if kind not in TARGET_KEYS:
            guess = TARGET_ALIASES.get(kind.lower())
            hint = f"did you mean '{guess}'?" if guess else "use cpu or cuda"
            raise self.error(f"unknown target '{kind}' ({hint})", sec.arg.loc)
        schema = TARGET_KEYS[kind]
        other = {k: f"'{k}' is not valid for target {kind} (only for target {other_kind})"
                 for other_kind, keys in TARGET_KEYS.items() if other_kind != kind
                 for k in keys if k not in schema}
        keys = self.fields(sec.body or [], f"target {kind}", schema, other)
        spec = TargetSpec(kind=kind, loc=sec.loc)
        if "threads" in keys:
            spec.threads = self.whole(keys["threads"].value, "threads")
        if "gpus" in keys:
            spec.gpus = self.whole(keys["gpus"].value, "gpus")
        if "arch" in keys:
            v = keys["arch"].value
            arch = self.word(v, "arch")
            if not ARCH_RE.fullmatch(arch):
                raise self.error(f"arch must look like sm_NN (e.g. sm_80, sm_90), got '{arch}'", v.loc)
            spec.arch = arch
        if "memory" in keys:
            spec.memory_bytes = self.quantity(keys["memory"].value, "memory", units.SIZE)
        return spec

    # -- workload --------------------------------------------------------------

    def workload(self, sec: Section) -> WorkloadSpec:
        body = self.block_only(sec, DEPLOYMENT_SECTIONS["workload"].usage)
        keys = self.fields(body, "workload", WORKLOAD_KEYS)
        for req in REQUIRED_WORKLOAD:
            if req not in keys:
                raise self.error(f"workload is missing '{req}' (e.g. '{WORKLOAD_KEYS[req].usage}')", sec.loc)
        spec = WorkloadSpec(
            arrivals=self.arrivals(keys["arrivals"].value),
            prompt_tokens=self.distribution(keys["prompt_tokens"].value, "prompt_tokens"),
            output_tokens=self.distribution(keys["output_tokens"].value, "output_tokens"),
            loc=sec.loc,
        )
        if "shared_prefix" in keys:
            spec.shared_prefix = self.shared_prefix(keys["shared_prefix"])
        if "dataset" in keys:
            spec.dataset = self.dataset(keys["dataset"].value)
        if "kind" in keys:
            spec.kind = self.choice(keys["kind"].value, "workload kind", WORKLOAD_KINDS,
                                    f"use {', '.join(WORKLOAD_KINDS)}")
        return spec

    def arrivals(self, v: Value) -> ArrivalSpec:
        call = self.call(v, "arrival process", ARRIVALS, "poisson(8 req/s) or closed(16)")
        bound = self.bind(call, ARRIVALS[call.name], 1)
        if call.name == "poisson":
            rate = self.quantity(bound["rate"], "the poisson rate", units.RATE)
            return ArrivalSpec(kind="poisson", rate=rate, loc=call.loc)
        concurrency = self.whole(bound["concurrency"], "the closed-loop concurrency")
        return ArrivalSpec(kind="closed", concurrency=concurrency, loc=call.loc)

    def distribution(self, v: Value, what: str) -> Distribution:
        call = self.call(v, f"{what} distribution", DISTRIBUTIONS, "fixed(64) or uniform(32, 256)")
        params = DISTRIBUTIONS[call.name]
        bound = self.bind(call, params, len(params))
        if call.name == "fixed":
            values = (float(self.whole(bound["n"], f"{what} fixed(n)")),)
        elif call.name == "uniform":
            lo = self.whole(bound["lo"], f"{what} uniform lo")
            hi = self.whole(bound["hi"], f"{what} uniform hi")
            if hi < lo:
                raise self.error(f"{what} uniform(lo, hi) needs lo <= hi, got uniform({lo}, {hi})", call.loc)
            values = (float(lo), float(hi))
        else:
            spread = params[1]
            mean = self.positive(bound["mean"], f"{what} {call.name} mean")
            width = self.positive(bound[spread], f"{what} {call.name} {spread}", allow_zero=True)
            values = (mean, width)
        return Distribution(kind=call.name, params=values, loc=call.loc)

    def shared_prefix(self, sec: Section) -> SharedPrefixSpec:
        body = self.block_only(sec, WORKLOAD_KEYS["shared_prefix"].usage)
        keys = self.fields(body, "shared_prefix", SHARED_PREFIX_KEYS)
        for req in ("tokens", "share"):
            if req not in keys:
                raise self.error(f"shared_prefix is missing '{req}' "
                                 f"(e.g. '{SHARED_PREFIX_KEYS[req].usage}')", sec.loc)
        tokens = self.whole(keys["tokens"].value, "shared_prefix tokens")
        v = keys["share"].value
        share = float(self.number(v, "share"))
        if not 0.0 <= share <= 1.0:
            raise self.error(f"share must be between 0 and 1, got '{v.text}'", v.loc)
        return SharedPrefixSpec(tokens=tokens, share=share, loc=sec.loc)

    def dataset(self, v: Value) -> Path:
        rel = self.string(v, "dataset")
        try:
            path = self.local_path(v)
            is_file = path.is_file()
        except (OSError, ValueError, RuntimeError):
            raise self.error(f"dataset path '{rel}' is not a usable path", v.loc) from None
        if not is_file:
            raise self.error(f"dataset file '{rel}' not found (looked for {path})", v.loc)
        return path

    # -- slo -------------------------------------------------------------------

    def slos(self, sec: Section) -> list[SLOSpec]:
        body = self.block_only(sec, DEPLOYMENT_SECTIONS["slo"].usage)
        out: list[SLOSpec] = []
        seen: dict[tuple, Compare] = {}
        for item in body:
            if item.name not in SLO_METRICS:
                raise self.error(f"unknown metric '{item.name}' in slo{suggest(item.name, SLO_METRICS)}; "
                                 f"use {', '.join(SLO_METRICS)}", item.loc)
            if not isinstance(item, Compare):
                example = "throughput >= 500 tok/s" if item.name == "throughput" else f"{item.name} p99 <= 200 ms"
                raise self.error(f"an objective is written '{example}'", item.loc)
            slo = self.objective(item)
            key = (slo.metric, slo.percentile)
            if key in seen:
                label = item.name + (f" {item.percentile.name}" if item.percentile else "")
                raise self.error(f"duplicate objective '{label}' (first given on line {seen[key].loc.line})",
                                 item.loc)
            seen[key] = item
            out.append(slo)
        return out

    def objective(self, item: Compare) -> SLOSpec:
        if item.name == "throughput":
            if item.percentile is not None:
                raise self.error("throughput takes no percentile: write 'throughput >= 500 tok/s'",
                                 item.percentile.loc)
            if item.op != ">=":
                raise self.error(f"throughput is a lower bound: use '>=', not '{item.op}'", item.op_loc)
            value = self.quantity(item.value, "throughput", units.THROUGHPUT)
            return SLOSpec(metric="throughput", percentile=None, op=">=", value=value, loc=item.loc)
        if item.percentile is None:
            raise self.error(f"{item.name} needs a percentile: write '{item.name} p99 <= ...'", item.op_loc)
        pname = item.percentile.name
        if pname not in PERCENTILES:
            raise self.error(f"unknown percentile '{pname}' (use p50, p90, p95, p99 or p99.9)",
                             item.percentile.loc)
        if item.op != "<=":
            raise self.error(f"{item.name} is an upper bound: use '<=', not '{item.op}'", item.op_loc)
        value = self.quantity(item.value, item.name, units.TIME)
        return SLOSpec(metric=item.name, percentile=PERCENTILES[pname], op="<=", value=value, loc=item.loc)

    # -- accuracy --------------------------------------------------------------

    def accuracy(self, sec: Section) -> AccuracySpec:
        usage = DEPLOYMENT_SECTIONS["accuracy"].usage
        body = self.block_only(sec, usage)
        if not body:
            raise self.error(f"accuracy needs one check: write '{usage}' "
                             "or 'accuracy { logits_tol(1e-3, probes = 4) }'", sec.loc)
        if len(body) > 1:
            raise self.error(f"accuracy takes one check, found {len(body)} "
                             f"(the first is on line {body[0].loc.line})", body[1].loc)
        item = body[0]
        if item.name not in ACCURACY_CHECKS:
            raise self.error(f"unknown accuracy check '{item.name}'{suggest(item.name, ACCURACY_CHECKS)}; "
                             f"use {' or '.join(ACCURACY_CHECKS)}", item.loc)
        if isinstance(item, Flag):
            call = Call(item.name, [], [], item.loc)
        elif isinstance(item, CallItem):
            call = item.call
        else:
            raise self.error(f"an accuracy check is written '{item.name}(...)', e.g. '{usage}'", item.loc)
        params, required = ACCURACY_CHECKS[call.name]
        bound = self.bind(call, params, required)
        spec = AccuracySpec(kind=call.name, loc=call.loc)
        if "probes" in bound:
            spec.probes = self.whole(bound["probes"], "probes")
        if "tolerance" in bound:
            spec.tolerance = self.positive(bound["tolerance"], "tolerance")
        return spec

    # -- serve -----------------------------------------------------------------

    def serve(self, sec: Section, slos: list[SLOSpec]) -> ServeSpec:
        body = self.block_only(sec, DEPLOYMENT_SECTIONS["serve"].usage)
        keys = self.fields(body, "serve", SERVE_KEYS)
        spec = ServeSpec(loc=sec.loc)
        if "host" in keys:
            v = keys["host"].value
            host = self.string(v, "host")
            if not host.strip() or any(c.isspace() for c in host):
                raise self.error(f"host must be a host name or address, got {describe_value(v)}", v.loc)
            spec.host = host
        if "port" in keys:
            v = keys["port"].value
            port = self.whole(v, "port")
            if port > 65535:
                raise self.error(f"port must be between 1 and 65535, got '{v.text}'", v.loc)
            spec.port = port
        if "max_context" in keys:
            v = keys["max_context"].value
            spec.max_context = self.whole(v, "max_context")
            limit = self.model_config.get("max_position_embeddings")
            if isinstance(limit, int) and not isinstance(limit, bool) and spec.max_context > limit:
                raise self.error(f"max_context {spec.max_context} is longer than the model's "
                                 f"max_position_embeddings ({limit})", v.loc)
        if "api" in keys:
            spec.api = self.choice(keys["api"].value, "api", APIS, f"vsc serves: {', '.join(APIS)}")
        if "overload" in keys:
            v = keys["overload"].value
            policy = self.choice(v, "overload", OVERLOAD_POLICIES, f"one of: {', '.join(OVERLOAD_POLICIES)}",
                                 noun="overload policy")
            if policy == "shed" and not any(s.metric == "ttft" and s.op in ("<=", "<") for s in slos):
                raise self.error("overload = shed sheds requests that would miss the TTFT objective; the slo block "
                                 "has none (add e.g. 'ttft p99 <= 200 ms')", v.loc)
            spec.overload = policy
        if "replicas" in keys:
            spec.replicas = self.whole(keys["replicas"].value, "replicas")
        if "router" in keys:
            v = keys["router"].value
            router = self.choice(v, "router", ROUTER_POLICIES, f"one of: {', '.join(ROUTER_POLICIES)}")
            if spec.replicas < 2:
                raise self.error(f"router = {router} routes among replicas; the serve block has one "
                                 "(add e.g. 'replicas = 2')", v.loc)
            spec.router = router
        return spec

    # -- optimize --------------------------------------------------------------

    def optimize(self, sec: Section) -> OptimizeSpec:
        usage = "optimize \"fuse-qkv,paged-kv{block=16}\" or optimize auto"
        arg = sec.arg
        if sec.body is not None or arg is None:
            raise self.error(f"optimize takes a pipeline string or 'auto', not a block: write '{usage}'", sec.loc)
        if isinstance(arg, Ident):
            if arg.name != "auto":
                raise self.error(f"optimize takes a pipeline string in double quotes or 'auto', "
                                 f"got '{arg.name}'", arg.loc)
            return OptimizeSpec(pipeline=None, auto=True, loc=arg.loc)
        pipeline = arg.value.strip()
        return OptimizeSpec(pipeline=pipeline or None, auto=False, loc=arg.loc)
