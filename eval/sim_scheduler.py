"""The simulated engine's batch builder: the embedded engine's own Scheduler.

No rules live here: `SimScheduler` is `sglang_slo.engine.scheduler.Scheduler` (plan
application, EDF fallback with its admission watermark, KV reservation and preemption)
driven with `SimRequest`s and `KvBlocks` block counts (through `TargetOnlyKv`). The
simulator has no context length limit, so `max_context` is unbounded.
"""

from __future__ import annotations

import sys

from eval.kv_blocks import KvBlocks
from sglang_slo.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig

SchedulerLimits = SchedulerConfig
"""The engine's scheduler config (max_batch_tokens, max_running, max_depth, max_width,
fallback_budget, and the fallback tree shape)."""
Batch = ScheduledBatch


class TargetOnlyKv:
    """The scheduler's `KvAccounting` over `KvBlocks`: the simulator models the target
    cache only (a draft cache would mirror it), so draft token counts are dropped."""

    def __init__(self, blocks: KvBlocks):
        self.blocks = blocks

    @property
    def block_size(self) -> int:
        return self.blocks.block_tokens

    def can_grow(self, rid: str, target_tokens: int, draft_tokens: int = 0) -> bool:
        return self.blocks.can_grow(rid, target_tokens)

    def grow(self, rid: str, target_tokens: int, draft_tokens: int = 0) -> bool:
        return self.blocks.grow(rid, target_tokens)

    def release(self, rid: str) -> None:
        self.blocks.release(rid)


class SimScheduler(Scheduler):
    """The engine's Scheduler over the simulator's KV accounting (no behaviour of its own)."""

    def __init__(self, limits: SchedulerConfig, kv: KvBlocks):
        super().__init__(limits, TargetOnlyKv(kv), max_context=sys.maxsize)
