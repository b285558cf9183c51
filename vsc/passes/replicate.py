"""replicate{n,router,prefix_blocks}: serve the plan as n replicas behind a router (Ray Serve).

What it changes: the deployment gets `replicas = n` and a `route` stage (vsc.ir.route) joins the
request graph between `tokenize` and `admit`, carrying the router policy (prefix_affinity,
round_robin or least_loaded), for prefix_affinity how many leading KV blocks of a prompt are
hashed, and the spec's TTFT objective (when it has one), which decides when prefix_affinity
falls back to the least-loaded replica. Nothing of one replica's model, cache or batching
changes: each replica runs this very plan (`vsc serve FOLDER --ray`, vsc.runtime.ray_serve).

When it pays: a throughput objective beyond what one replica measures. prefix_affinity keeps
what the prefix cache, speculation and batching bought per replica: requests that share a
system prompt land where its KV blocks are cached, so the hit rate stays near one server's
rather than dropping by the number of replicas (as round_robin makes it). What it costs:
n times the memory and cores; a hash of the first blocks of each prompt at the ingress.
The outputs do not change (greedy outputs are one replica's), so it needs no accuracy check.
"""
from __future__ import annotations

from vsc.errors import VscError
from vsc.ir.module import ServingModule
from vsc.ir.route import DEFAULT_PREFIX_BLOCKS, add_route, ttft_objective_ms
from vsc.ir.types import pass_origin
from vsc.passes.base import Option, Pass, register_pass
from vsc.runtime.enums import ROUTER_POLICIES



@register_pass
class Replicate(Pass):
    name = "replicate"
    summary = "serve the plan as n replicas (Ray Serve) behind a router: prefix affinity, round robin, least loaded"
    options = (
        Option("n", int, 2, "replicas (each runs the whole plan)", minimum=2),
        Option("router", str, "prefix_affinity", "how the ingress picks a replica", choices=ROUTER_POLICIES),
        Option("prefix_blocks", int, DEFAULT_PREFIX_BLOCKS, "leading KV blocks of a prompt that prefix_affinity hashes",
               minimum=1),
    )

    def apply(self, module: ServingModule) -> None:
        if self.router != "prefix_affinity" and self.prefix_blocks != DEFAULT_PREFIX_BLOCKS:
            raise VscError(f"prefix_blocks is prefix_affinity's; router={self.router} hashes nothing")
        try:
            add_route(module, self.n, self.router, pass_origin(self.name), ttft_objective_ms(module.deployment),
                      self.prefix_blocks)
        except ValueError as e:
            raise VscError(str(e)) from None
