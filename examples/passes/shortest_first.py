"""A complete user pass: schedule the shortest prompts first (vsc opt --load-pass this file)."""
from vsc.ir.types import pass_origin
from vsc.passes.base import Option, Pass, register_pass


@register_pass
class ShortestFirst(Pass):
    name = "shortest-first"
    summary = "admit requests with the shortest prompts first (lower mean TTFT under load)"
    options = (Option("max_batch", int, 0, "also set max_batch (0: keep)", minimum=0),)

    def apply(self, module):
        module.batching.order = "shortest-first"
        if self.max_batch:
            module.batching.max_batch = self.max_batch
        module.batching.origin = pass_origin(self.name)
