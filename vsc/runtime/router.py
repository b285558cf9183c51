"""Which replica serves a request: the ingress's router when a plan runs as several replicas.

Policies (vsc.runtime.enums.ROUTER_POLICIES, the manifest's "router" entry that the plan's route
stage wrote, vsc.ir.route):

- prefix_affinity: the prompt's first `prefix_blocks` full KV blocks (`block_tokens` tokens each,
  the cache's block size, so equal hashes mean equal cached blocks) are hashed, and rendezvous
  hashing over the replicas that are up picks the preferred replica: prompts sharing that prefix
  land where its blocks are cached, every ingress agrees without sharing state, and a replica
  going down moves only its own prefixes. A prompt shorter than one block has nothing cached to
  find: it goes to the least-loaded replica. The preferred replica is passed over for the
  least-loaded one when its queue would break the TTFT objective (`ttft_slo_ms`: its predicted
  TTFT, requests waiting for their first token times its measured seconds per such request,
  exceeds the objective and the other's is lower) or, without an objective, when its batch is
  full (`max_batch` requests in flight) and the other's is not.
- round_robin: replicas that are up in turn.
- least_loaded: the replica with the fewest requests in flight (ties: the lowest index).

Load is what this ingress sent and has not seen finish; `update_load` adds the engines' own queue
(their stats' waiting + running, polled), for requests other ingresses sent. Pure Python, no Ray:
vsc.runtime.ray_serve drives it.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

from vsc.runtime.enums import ROUTER_POLICIES

#: Weight of a new TTFT sample in the per-replica estimate of seconds per queued request.
EWMA_ALPHA = 0.3


@dataclass
class RouterConfig:
    """The manifest's "router" entry."""

    replicas: int
    policy: str = "prefix_affinity"
    block_tokens: int = 16
    prefix_blocks: int = 4
    max_batch: int = 8
    ttft_slo_ms: float | None = None

    def __post_init__(self) -> None:
        if self.policy not in ROUTER_POLICIES:
            raise ValueError(f"unknown router policy {self.policy!r} (one of: {', '.join(ROUTER_POLICIES)})")
        for name in ("replicas", "block_tokens", "prefix_blocks", "max_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"router {name} must be an int >= 1, got {v!r}")


@dataclass
class ReplicaLoad:
    in_flight: int = 0             # sent by this ingress, not finished
    awaiting_first: int = 0        # of those, no first event yet
    engine_queue: int = 0          # the engine's waiting + running at the last poll
    up: bool = True
    seconds_per_queued: float | None = None    # EWMA of ttft / (requests awaiting first token at dispatch)
    routed: dict[str, int] = field(default_factory=dict)    # reason -> requests


def prefix_key(prompt_ids: list[int], block_tokens: int, prefix_blocks: int) -> bytes | None:
    """A digest of the prompt's leading full KV blocks (at most `prefix_blocks`); None without one."""
    full = min(len(prompt_ids) // block_tokens, prefix_blocks)
    if full == 0:
        return None
    tokens = prompt_ids[:full * block_tokens]
    return hashlib.blake2b(struct.pack(f"<{len(tokens)}q", *tokens), digest_size=16).digest()


def _score(key: bytes, replica: int) -> bytes:
    return hashlib.blake2b(key + replica.to_bytes(4, "little"), digest_size=8).digest()


class Router:
    """Chooses replicas and keeps their load; not thread-safe (the ingress's event loop owns it)."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.loads = [ReplicaLoad() for _ in range(config.replicas)]
        self._next = 0

    # ---------------------------------------------------------------- choice
    def choose(self, prompt_ids: list[int], exclude: frozenset[int] | set[int] = frozenset()) -> tuple[int | None, str]:
        """(replica index, reason) for a request; (None, "none_up") when no replica may take it.
        reason: affinity | ttft_fallback | batch_fallback | no_prefix | round_robin | least_loaded."""
        up = [i for i, load in enumerate(self.loads) if load.up and i not in exclude]
        if not up:     # every replica seems down: try one anyway (Ray Serve may have replaced it)
            up = [i for i in range(len(self.loads)) if i not in exclude]
            if not up:
                return None, "none_up"
        policy = self.config.policy
        if policy == "round_robin":
            pick = min(up, key=lambda i: (i - self._next) % len(self.loads))
            self._next = (pick + 1) % len(self.loads)
            return pick, "round_robin"
        least = min(up, key=lambda i: (self.load(i), i))
        if policy == "least_loaded":
            return least, "least_loaded"
        key = prefix_key(prompt_ids, self.config.block_tokens, self.config.prefix_blocks)
        if key is None:
            return least, "no_prefix"
        preferred = max(up, key=lambda i: _score(key, i))
        if preferred == least:
            return preferred, "affinity"
        slo = self.config.ttft_slo_ms
        if slo is not None:
            mine, other = self.predicted_ttft_ms(preferred), self.predicted_ttft_ms(least)
            if mine is not None and mine > slo and (other is None or other < mine):
                return least, "ttft_fallback"
        elif self.load(preferred) >= self.config.max_batch and self.load(least) < self.config.max_batch:
            return least, "batch_fallback"
        return preferred, "affinity"

    def load(self, i: int) -> int:
        load = self.loads[i]
        return max(load.in_flight, load.engine_queue)

    def predicted_ttft_ms(self, i: int) -> float | None:
        """A new request's TTFT on replica i: the requests ahead of it (awaiting a first token) and
        itself, times the replica's measured seconds per such request; None before a measurement."""
        load = self.loads[i]
        if load.seconds_per_queued is None:
            return None
        return 1000.0 * load.seconds_per_queued * (load.awaiting_first + 1)

    # ---------------------------------------------------------------- bookkeeping
    def dispatched(self, i: int, reason: str) -> int:
        """A request goes to replica i; returns how many await their first token there (itself included)."""
        load = self.loads[i]
        load.in_flight += 1
        load.awaiting_first += 1
        load.routed[reason] = load.routed.get(reason, 0) + 1
        return load.awaiting_first

    def first_event(self, i: int, ttft_s: float, queued: int) -> None:
        """Replica i produced a request's first event `ttft_s` after dispatch, with `queued` requests
        (itself included) awaiting theirs when it was sent."""
        load = self.loads[i]
        load.awaiting_first = max(0, load.awaiting_first - 1)
        sample = ttft_s / max(1, queued)
        prev = load.seconds_per_queued
        load.seconds_per_queued = sample if prev is None else (1 - EWMA_ALPHA) * prev + EWMA_ALPHA * sample

    def finished(self, i: int, started: bool) -> None:
        """A request on replica i ended (`started`: it had its first event)."""
        load = self.loads[i]
        load.in_flight = max(0, load.in_flight - 1)
        if not started:
            load.awaiting_first = max(0, load.awaiting_first - 1)

    def set_up(self, i: int, up: bool) -> None:
        self.loads[i].up = up

    def update_load(self, i: int, engine_queue: int) -> None:
        self.loads[i].engine_queue = engine_queue
