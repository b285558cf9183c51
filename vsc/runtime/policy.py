"""Policy numbers a compiled plan gets by default, declared once for the compiler (vsc.ir.plan
writes them into the manifest) and the runtime (which applies them). Imports nothing."""

#: The waiting-queue bound a compiled plan gets (EngineConfig.max_waiting; beyond it a request is
#: refused with 429, whatever the overload policy): QUEUE_PER_BATCH_ROW waiting requests per row
#: of the plan's batch, and never fewer than MIN_QUEUE.
QUEUE_PER_BATCH_ROW = 16
MIN_QUEUE = 64


def queue_bound(max_batch: int) -> int:
    """EngineConfig.max_waiting for a plan whose steps carry at most `max_batch` sequences."""
    return max(MIN_QUEUE, QUEUE_PER_BATCH_ROW * max_batch)
