"""Fit a policy's wished speculation shape to what the engine can run."""

from __future__ import annotations

from operator import attrgetter

from sidecar.cost_model import CostModel, EngineLimits

_cap_of = attrgetter("tree_cap")
_tokens_of = attrgetter("tokens")


def snap_depth(depth: int, limits: EngineLimits, spec_enabled: bool = True) -> int:
    """Largest runnable depth <= `depth` (engine max, depth tiers; 0 when speculation is off)."""
    if not spec_enabled or depth <= 0:
        return 0
    depth = min(depth, limits.max_depth)
    if limits.depth_tiers:
        fitting = [d for d in limits.depth_tiers if d <= depth]
        return fitting[-1] if fitting else 0
    return depth


def snap_width(width: int, limits: EngineLimits) -> int:
    return max(1, min(width, limits.max_width))


def knee_budget(cost: CostModel, limits: EngineLimits, factor: float = 2.0) -> int:
    """The knee of the tokens -> latency curve: the batch size whose iteration takes `factor`
    times a one-token iteration (memory-bound flat part ends), clipped to the engine limit."""
    t1 = cost.iteration_time(0, 1, 0, 0)
    b = cost.max_tokens_within(factor * t1) if t1 > 0 else limits.max_batch_tokens
    return max(1, min(limits.max_batch_tokens, b))


def covering_budget(budget: int, decode: list, prefill: list, max_batch_tokens: int = 1 << 30) -> int:
    """A token budget that runs every planned chunk within the engine's batch limit.

    Engines reserve each decode entry's full tree cap before prefill (sim_scheduler, embedded
    scheduler), so B >= sum caps + chunks. When that exceeds max(max_batch_tokens, entries),
    trailing chunks shrink first, then the largest trees (entries and chunks are edited in place).
    """
    limit = max(max_batch_tokens, len(decode))
    caps = sum(map(_cap_of, decode))
    pre = sum(map(_tokens_of, prefill))
    excess = caps + pre - limit
    if excess <= 0:  # fits as planned: nothing to shrink
        return min(max(budget, caps + pre), limit)
    while excess > 0 and prefill:
        c = prefill[-1]
        cut = min(excess, c.tokens)
        c.tokens -= cut
        excess -= cut
        if c.tokens <= 0:
            prefill.pop()
    if excess > 0:  # shrink trees toward 1 node, largest first, one level at a time
        level = max((e.tree_cap for e in decode), default=1)
        while excess > 0 and level > 1:
            level -= 1
            for e in decode:
                if e.tree_cap > level:
                    excess -= e.tree_cap - level
                    e.tree_cap = level
                    if level == 1:
                        e.depth, e.width = 0, 1
                    elif e.min_tokens > level:
                        e.min_tokens = float(level)
    need = sum(map(_cap_of, decode)) + sum(map(_tokens_of, prefill))
    return min(max(budget, need), limit)


__all__ = ["snap_depth", "snap_width", "knee_budget", "covering_budget"]
