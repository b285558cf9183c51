"""prefix-cache{policy,capacity}: reuse the KV blocks of prompt prefixes requests share.

What it changes: the cache section gets `prefix_sharing = "radix"` and `eviction = "lru"`,
and a `prefix_lookup` stage (carrying `policy` and `capacity`) joins the request graph
between `admit` and `prefill`. The server's engine then keeps every full KV block it has
computed in a radix tree keyed by (parent block, the block's tokens) — see
vsc.runtime.prefix_cache — and a new request takes the blocks of its longest cached
prefix instead of recomputing them: it prefills only the rest. Blocks are refcounted
and shared read-only; blocks no request holds stay cached until their room is needed,
then go least recently used first. The model graph is untouched.

When it pays: long shared prefixes — a system prompt, tool definitions, few-shot
examples, earlier turns of a chat — where most of a prompt's prefill is skipped, which
cuts TTFT and frees step budget for decodes (examples/shared-prefix.vs: 90% of requests
share a 512-token prefix). What it costs: a tree lookup per admission (one dict lookup
per full block of the prompt), one insert per block as it fills, and freed blocks are
kept warm instead of cleared — harmless for memory, as a cached block nobody holds is
reclaimed on demand. Prompts that share nothing pay the lookups for no gain.

`capacity`: the most cached blocks kept that no request holds (0: any free block may
keep cached content). Exact: a hit is the same K/V the prefill would compute (up to the
float noise of a different batch), but it changes what the runtime does, so the pass has
may_change_outputs=True: the accuracy check runs after it, including its run through
the engine with requests that share prefixes with earlier ones (and a one-token-shifted
prompt that a cache keyed on a block's tokens alone would wrongly hit).
"""
from __future__ import annotations

from vsc.errors import VscError
from vsc.ir.module import ServingModule, Stage
from vsc.ir.plan import PREFIX_LOOKUP_STAGE as STAGE
from vsc.ir.types import pass_origin
from vsc.passes.base import Option, Pass, register_pass
from vsc.runtime.enums import PREFIX_CACHE_POLICIES

@register_pass
class PrefixCache(Pass):
    name = "prefix-cache"
    summary = "reuse cached KV blocks of shared prompt prefixes (radix tree, refcounted, LRU eviction)"
    requires = ("paged-kv",)
    options = (
        Option("policy", str, "radix", "how cached blocks are found",
               choices=tuple(p for p in PREFIX_CACHE_POLICIES if p != "none")),
        Option("capacity", int, 0, "most cached blocks kept that no request holds (0: any free block)", minimum=0),
    )
    may_change_outputs = True

    def apply(self, module: ServingModule) -> None:
        cache = module.cache
        if cache.layout != "paged":
            raise VscError("prefix caching needs a paged KV cache (run paged-kv first)")
        blocks = cache.capacity_tokens // cache.block_size
        if self.capacity > blocks:
            raise VscError(f"capacity={self.capacity} blocks exceeds the KV cache's {blocks} blocks")
        requests = module.requests
        if requests.stage(STAGE) is not None:
            raise VscError("the plan already has a prefix_lookup stage (prefix-cache given twice?)")
        if ("admit", "prefill") not in requests.edges():
            raise VscError("prefix-cache needs the request graph's admit -> prefill edge")
        cache.prefix_sharing, cache.eviction = self.policy, "lru"
        cache.origin = pass_origin(self.name)
        stage = Stage(STAGE, {"policy": self.policy, "capacity": self.capacity}, pass_origin(self.name))
        requests.insert_between(stage, "admit", "prefill")
