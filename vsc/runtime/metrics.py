"""Prometheus metrics of a generated server.

Every `ServerMetrics` owns its own `CollectorRegistry` (never the process-global one), so
a process can build several apps (tests do). Latencies are what a client sees: the HTTP
layer measures them from the request's arrival and from the moment each TokenEvent
reaches it. Engine state (running/waiting requests, KV blocks) is read from
`engine.stats()` when /metrics is scraped, never pushed per step.
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


class _EngineStatsCollector:
    """Gauges read from a stats callable at scrape time."""

    def __init__(self) -> None:
        self.stats: Callable[[], Mapping[str, float]] | None = None

    def describe(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        return ([GaugeMetricFamily(name, doc) for _, name, doc in ENGINE_GAUGES]
                + [CounterMetricFamily(name, doc) for _, name, doc in ENGINE_COUNTERS])

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
        return out


class ServerMetrics:
    """The server's metrics, in a dedicated registry.

    Attributes the HTTP layer uses on the hot path: `ttft`, `itl`, `e2e` (histograms),
    `generated_tokens`, `prompt_tokens` (counters), `requests` (counter, label finish_reason),
    `rejected` (counter, label reason: queue_full | ttft_slo).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("vsc_time_to_first_token_seconds",
                              "Time from a request's arrival to its first output event, as the HTTP layer sees it.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vsc_inter_token_latency_seconds",
                             "Time between consecutive output events of one request, as the HTTP layer sees it.",
                             buckets=ITL_BUCKETS, registry=r)
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
        self._engine = _EngineStatsCollector()
        r.register(self._engine)

    def bind_engine(self, engine) -> None:
        """Read the running/waiting/KV gauges from `engine.stats()` at every scrape."""
        self._engine.stats = engine.stats

    def request_finished(self, finish_reason: str, prompt_tokens: int, completion_tokens: int,
                         e2e_seconds: float) -> None:
        """Count one finished request (any reason, aborts included)."""
        child = self._by_reason.get(finish_reason)
        if child is None:
            child = self._by_reason[finish_reason] = self.requests.labels(finish_reason=finish_reason)
        child.inc()
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens)
        if completion_tokens:
            self.generated_tokens.inc(completion_tokens)
        self.e2e.observe(e2e_seconds)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition (body, content type), negotiated from an Accept header like prometheus_client does."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
