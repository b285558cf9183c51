"""Prometheus metrics of a generated server.

Every `ServerMetrics` owns its own `CollectorRegistry` (never the process-global one), so
a process can build several apps (tests do). Latencies are what a client sees: the HTTP
layer measures them from the request's arrival and from the moment each TokenEvent
reaches it. Engine state (running/waiting requests, KV blocks) is read from
`engine.stats()` when /metrics is scraped, never pushed per step.

Two name sets, one set of measurements: vsc's own families (`vsc_` prefix) and vLLM's
(`vllm:` prefix, the names, types, label names and histogram buckets of vLLM's
PrometheusStatLogger, labels `model_name` and `engine`), which gateways and dashboards
built for vLLM read unchanged (the Gateway API inference extension, KServe). Each
measurement is taken once and fed to both (`_Both`, `request_finished`, the scrape-time
collector), so the two sets never disagree. vLLM families vsc has no measurement for
(LoRA, per-phase prefill/decode times) are not exported.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

log = logging.getLogger("vsc.runtime.metrics")

# CPU serving of small models: first tokens in a few ms to tens of seconds under load.
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075,
                0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
# One decode step: sub-millisecond (tiny models) to a second (big batch on CPU).
ITL_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03,
               0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0,
               30.0, 45.0, 60.0, 120.0, 300.0)

# vLLM's buckets (vllm/v1/metrics/loggers.py)
VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                     10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
VLLM_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                     20.0, 40.0, 80.0)
VLLM_REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                                60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
#: vLLM's label names; a vsc server is one engine, "0"
VLLM_LABELS = ("model_name", "engine")
VLLM_ENGINE_INDEX = "0"
#: The finish reasons of vllm:request_success (vLLM's FinishReason), exposed at 0 from the start.
VLLM_FINISHED_REASONS = ("stop", "length", "abort", "error")

# engine.stats() key -> (gauge name, help)
ENGINE_GAUGES = (
    ("running", "vsc_requests_running", "Requests currently being decoded or prefilled."),
    ("waiting", "vsc_requests_waiting", "Requests admitted to the engine but waiting to be scheduled."),
    ("kv_blocks_used", "vsc_kv_blocks_used", "KV-cache blocks in use."),
    ("kv_blocks_total", "vsc_kv_blocks_total", "KV-cache blocks in the pool."),
    ("prefix_cached_blocks", "vsc_prefix_cache_blocks", "KV-cache blocks whose content the prefix cache holds for reuse."),
)
# engine.stats() key -> (counter name, help); monotonic engine totals (prometheus adds _total)
ENGINE_COUNTERS = (
    ("prefix_query_tokens", "vsc_prefix_cache_query_tokens",
     "Tokens of admitted requests looked up in the prefix cache."),
    ("prefix_hit_tokens", "vsc_prefix_cache_hit_tokens",
     "Tokens found in the prefix cache at admission (their prefill was skipped)."),
    ("prefix_evictions", "vsc_prefix_cache_evictions", "Cached KV blocks evicted to make room."),
    ("spec_draft_tokens", "vsc_spec_draft_tokens", "Draft tokens speculative decoding verified."),
    ("spec_accepted_tokens", "vsc_spec_accepted_tokens", "Draft tokens the model accepted (emitted without a step of their own)."),
    ("jump_forward_tokens", "vsc_jump_forward_tokens",
     "Grammar-forced tokens of json-mode requests emitted without a step of their own (jump-forward)."),
)

# vLLM's families read from engine.stats(): (name, gauge or counter, help, value of a stats mapping)
VLLM_ENGINE = (
    ("vllm:num_requests_running", GaugeMetricFamily, "Number of requests in model execution batches.",
     lambda s: s.get("running", 0.0)),
    ("vllm:num_requests_waiting", GaugeMetricFamily, "Number of requests waiting to be processed.",
     lambda s: s.get("waiting", 0.0)),
    ("vllm:kv_cache_usage_perc", GaugeMetricFamily, "KV-cache usage. 1 means 100 percent usage.",
     lambda s: _kv_usage(s)),
    # vLLM's name before 0.9, still what older gateway endpoint pickers read: the same value
    ("vllm:gpu_cache_usage_perc", GaugeMetricFamily,
     "GPU KV-cache usage. 1 means 100 percent usage. DEPRECATED: Use vllm:kv_cache_usage_perc instead.",
     lambda s: _kv_usage(s)),
    ("vllm:prefix_cache_queries", CounterMetricFamily,
     "Prefix cache queries, in terms of number of queried tokens.", lambda s: s.get("prefix_query_tokens", 0.0)),
    ("vllm:prefix_cache_hits", CounterMetricFamily,
     "Prefix cache hits, in terms of number of cached tokens.", lambda s: s.get("prefix_hit_tokens", 0.0)),
    ("vllm:num_preemptions", CounterMetricFamily, "Cumulative number of preemption from the engine.",
     lambda s: s.get("preemptions", 0.0)),
    ("vllm:spec_decode_num_draft_tokens", CounterMetricFamily, "Number of draft tokens.",
     lambda s: s.get("spec_draft_tokens", 0.0)),
    ("vllm:spec_decode_num_accepted_tokens", CounterMetricFamily, "Number of accepted tokens.",
     lambda s: s.get("spec_accepted_tokens", 0.0)),
)


def _kv_usage(stats: Mapping[str, float]) -> float:
    total = stats.get("kv_blocks_total")
    return stats.get("kv_blocks_used", 0.0) / total if total else 0.0


def build_1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `max_value` (vLLM's token-count buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


class _Both:
    """One measurement observed into vsc's histogram and vLLM's (bound to its labels at bind time)."""

    __slots__ = ("vsc", "vllm")

    def __init__(self, vsc: Histogram) -> None:
        self.vsc, self.vllm = vsc, None

    def observe(self, value: float) -> None:
        self.vsc.observe(value)
        if self.vllm is not None:
            self.vllm.observe(value)


class _EngineStatsCollector:
    """Gauges read from a stats callable at scrape time."""

    def __init__(self) -> None:
        self.stats: Callable[[], Mapping[str, float]] | None = None
        self.model_name: str | None = None      # set when bound: vLLM's families need their labels

    def describe(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        return ([GaugeMetricFamily(name, doc) for _, name, doc in ENGINE_GAUGES]
                + [CounterMetricFamily(name, doc) for _, name, doc in ENGINE_COUNTERS]
                + [kind(name, doc, labels=VLLM_LABELS) for name, kind, doc, _ in VLLM_ENGINE])

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        values: Mapping[str, float] = {}
        if self.stats is not None:
            try:
                values = self.stats() or {}
            except Exception:  # a scrape must never take the server down
                log.exception("engine.stats() failed during a metrics scrape")
                values = {}
        out = []
        for key, name, doc in ENGINE_GAUGES:
            out.append(GaugeMetricFamily(name, doc, value=float(values.get(key, 0.0))))
        for key, name, doc in ENGINE_COUNTERS:
            out.append(CounterMetricFamily(name, doc, value=float(values.get(key, 0.0))))
        for name, kind, doc, read in VLLM_ENGINE:
            family = kind(name, doc, labels=VLLM_LABELS)
            if self.model_name is not None:
                family.add_metric([self.model_name, VLLM_ENGINE_INDEX], float(read(values)))
            out.append(family)
        return out


class _ReplicaStatsCollector:
    """The ingress of several replicas (vsc.runtime.ray_serve): each engine family once, with one sample per
    replica (label `replica`; vLLM's families: `engine` = the replica's index, as vLLM labels its engines),
    plus whether each replica is up and how many requests the router sent it, by reason."""

    def __init__(self, replicas: Callable[[], list[tuple[str, Mapping[str, float] | None, bool, Mapping[str, int]]]],
                 model_name: str) -> None:
        self.replicas, self.model_name = replicas, model_name

    def describe(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        return []       # collected at scrape time only (the replica set is known then)

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        try:
            rows = self.replicas()
        except Exception:  # a scrape must never take the server down
            log.exception("reading the replicas' stats failed during a metrics scrape")
            rows = []
        gauges = [(key, GaugeMetricFamily(name, doc, labels=["replica"])) for key, name, doc in ENGINE_GAUGES]
        counters = [(key, CounterMetricFamily(name, doc, labels=["replica"])) for key, name, doc in ENGINE_COUNTERS]
        vllm = [(read, kind(name, doc, labels=VLLM_LABELS)) for name, kind, doc, read in VLLM_ENGINE]
        up = GaugeMetricFamily("vsc_replica_up", "1 while the replica answers the ingress's polls.", labels=["replica"])
        routed = CounterMetricFamily("vsc_router_requests", "Requests the router sent to each replica, by reason "
                                     "(affinity, ttft_fallback, batch_fallback, no_prefix, round_robin, least_loaded, "
                                     "retry).", labels=["replica", "reason"])
        for label, stats, is_up, by_reason in rows:
            up.add_metric([label], 1.0 if is_up else 0.0)
            for reason, n in sorted(by_reason.items()):
                routed.add_metric([label, reason], float(n))
            if stats is None:       # never answered: no engine samples
                continue
            for key, family in gauges + counters:
                family.add_metric([label], float(stats.get(key, 0.0)))
            for read, family in vllm:
                family.add_metric([self.model_name, label], float(read(stats)))
        return [family for _, family in gauges + counters] + [family for _, family in vllm] + [up, routed]


class ServerMetrics:
    """The server's metrics, in a dedicated registry.

    Attributes the HTTP layer uses on the hot path: `ttft`, `itl` (each observes vsc's
    histogram and vLLM's), `e2e` (histogram), `generated_tokens`, `prompt_tokens` (counters),
    `requests` (counter, label finish_reason), `rejected` (counter, label reason: queue_full |
    ttft_slo). vLLM's families get their `model_name` label from `bind_engine`.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.ttft = _Both(Histogram("vsc_time_to_first_token_seconds",
                                    "Time from a request's arrival to its first output event, as the HTTP layer "
                                    "sees it.", buckets=TTFT_BUCKETS, registry=r))
        self.itl = _Both(Histogram("vsc_inter_token_latency_seconds",
                                   "Time between consecutive output events of one request, as the HTTP layer "
                                   "sees it.", buckets=ITL_BUCKETS, registry=r))
        self.e2e = Histogram("vsc_e2e_request_latency_seconds",
                             "Time from a request's arrival to its last output event.",
                             buckets=E2E_BUCKETS, registry=r)
        self.generated_tokens = Counter("vsc_generated_tokens", "Completion tokens returned to clients.", registry=r)
        self.prompt_tokens = Counter("vsc_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.requests = Counter("vsc_requests", "Finished requests by finish reason.", ["finish_reason"], registry=r)
        self.rejected = Counter("vsc_requests_rejected",
                                "Requests refused with 429 before any work: reason queue_full (the waiting queue "
                                "is at its bound) or ttft_slo (overload = shed: predicted to miss the TTFT objective).",
                                ["reason"], registry=r)
        for reason in ("queue_full", "ttft_slo"):     # exposed at 0 before the first refusal
            self.rejected.labels(reason=reason)
        self._by_reason: dict[str, Counter] = {}
        # vLLM's names (labelled children made by bind_engine, once the model name is known)
        self._vllm_ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                                    VLLM_LABELS, buckets=VLLM_TTFT_BUCKETS, registry=r)
        self._vllm_tpot = Histogram("vllm:time_per_output_token_seconds",
                                    "Histogram of time per output token in seconds.", VLLM_LABELS,
                                    buckets=VLLM_TPOT_BUCKETS, registry=r)
        self._vllm_e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                                   VLLM_LABELS, buckets=VLLM_REQUEST_LATENCY_BUCKETS, registry=r)
        self._vllm_queue = Histogram("vllm:request_queue_time_seconds",
                                     "Histogram of time spent in WAITING phase for request.", VLLM_LABELS,
                                     buckets=VLLM_REQUEST_LATENCY_BUCKETS, registry=r)
        self._vllm_prompt = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", VLLM_LABELS,
                                    registry=r)
        self._vllm_generation = Counter("vllm:generation_tokens", "Number of generation tokens processed.",
                                        VLLM_LABELS, registry=r)
        self._vllm_success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                     (*VLLM_LABELS, "finished_reason"), registry=r)
        self._vllm: dict[str, object] | None = None      # the bound children
        self._vllm_request_tokens: tuple[Histogram, Histogram] | None = None     # buckets need the context
        self._vllm_by_reason: dict[str, Counter] = {}
        self._engine = _EngineStatsCollector()
        r.register(self._engine)

    def bind_engine(self, engine, model_name: str = "") -> None:
        """Read the running/waiting/KV gauges from `engine.stats()` at every scrape, and label
        vLLM's families with `model_name` (the served model name)."""
        self._engine.stats = engine.stats
        self._engine.model_name = model_name
        labels = (model_name, VLLM_ENGINE_INDEX)
        self.ttft.vllm = self._vllm_ttft.labels(*labels)
        self.itl.vllm = self._vllm_tpot.labels(*labels)
        self._vllm = {"e2e": self._vllm_e2e.labels(*labels), "queue": self._vllm_queue.labels(*labels),
                      "prompt": self._vllm_prompt.labels(*labels),
                      "generation": self._vllm_generation.labels(*labels)}
        context = getattr(engine, "max_context", None)
        if self._vllm_request_tokens is None and isinstance(context, int) and context > 0:
            buckets = build_1_2_5_buckets(context)
            self._vllm_request_tokens = (
                Histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.", VLLM_LABELS,
                          buckets=buckets, registry=self.registry),
                Histogram("vllm:request_generation_tokens", "Number of generation tokens processed.", VLLM_LABELS,
                          buckets=buckets, registry=self.registry))
        if self._vllm_request_tokens is not None:
            self._vllm["request_prompt"] = self._vllm_request_tokens[0].labels(*labels)
            self._vllm["request_generation"] = self._vllm_request_tokens[1].labels(*labels)
        self._vllm_by_reason = {reason: self._vllm_success.labels(*labels, reason)
                                for reason in VLLM_FINISHED_REASONS}

    def bind_replicas(self, replicas, model_name: str = "") -> None:
        """An ingress over several replicas: the engine families come from `replicas()` (rows of (replica
        label, its engine stats or None, up, requests routed to it by reason)) with a `replica` label,
        in place of one engine's unlabelled ones. Call after bind_engine."""
        self.registry.unregister(self._engine)
        self._engine = _ReplicaStatsCollector(replicas, model_name)
        self.registry.register(self._engine)

    def request_finished(self, finish_reason: str, prompt_tokens: int, completion_tokens: int,
                         e2e_seconds: float, queue_seconds: float | None = None) -> None:
        """Count one finished request (any reason, aborts included), in both name sets;
        `queue_seconds`: its time waiting to be scheduled, when the engine reported it."""
        child = self._by_reason.get(finish_reason)
        if child is None:
            child = self._by_reason[finish_reason] = self.requests.labels(finish_reason=finish_reason)
        child.inc()
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens)
        if completion_tokens:
            self.generated_tokens.inc(completion_tokens)
        self.e2e.observe(e2e_seconds)
        v = self._vllm
        if v is None:
            return
        success = self._vllm_by_reason.get(finish_reason)
        if success is not None:     # vLLM's reasons only (it has no other)
            success.inc()
        if prompt_tokens:
            v["prompt"].inc(prompt_tokens)
        if completion_tokens:
            v["generation"].inc(completion_tokens)
        v["e2e"].observe(e2e_seconds)
        if "request_prompt" in v:
            v["request_prompt"].observe(prompt_tokens)
            v["request_generation"].observe(completion_tokens)
        if queue_seconds is not None:
            v["queue"].observe(max(0.0, queue_seconds))

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition (body, content type), negotiated from an Accept header like prometheus_client does."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
