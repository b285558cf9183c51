"""continuous-batching{max_batch,max_tokens}: admit and retire requests at every step.

Pays under any open-loop or mixed-length load: with static batching a batch runs until
its longest request ends, so short requests wait and slots idle; iteration-level
scheduling (Orca, vLLM) refills a slot the step after it frees. `max_tokens` is the
token budget of one step (prefill tokens + one per decoding sequence).
"""
from __future__ import annotations

from vsc.errors import VscError
from vsc.ir.module import ServingModule
from vsc.ir.types import pass_origin
from vsc.passes.base import Option, Pass, register_pass
from vsc.ir.sizes import kv_bytes_per_token


@register_pass
class ContinuousBatching(Pass):
    name = "continuous-batching"
    summary = "iteration-level scheduling: requests join and leave the batch every step"
    options = (
        Option("max_batch", int, 32, "most sequences in one step", minimum=1),
        Option("max_tokens", int, 2048, "token budget of one step", minimum=1),
    )

    def apply(self, module: ServingModule) -> None:
        b, cache = module.batching, module.cache
        if cache.layout == "contiguous":
            # Every slot reserves a whole max_context slab: grow the slab pool or refuse.
            need = self.max_batch * module.deployment["max_context"]
            if need * kv_bytes_per_token(module.model.attrs, module.cache.dtype) > cache.budget_bytes:
                raise VscError(f"max_batch={self.max_batch} needs {need} tokens of contiguous KV cache, more than the "
                               f"budget holds; run paged-kv first or lower max_batch")
            cache.capacity_tokens = need
            cache.origin = pass_origin(self.name)
        b.mode, b.max_batch, b.max_tokens = "continuous", self.max_batch, self.max_tokens
        b.origin = pass_origin(self.name)
        admit = module.requests.stage("admit")
        if admit is not None:
            admit.attrs["every_step"] = True
            admit.origin = pass_origin(self.name)
