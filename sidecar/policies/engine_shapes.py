"""Fit a policy's wished speculation shape to what the engine can run."""

from __future__ import annotations

from sidecar.cost_model import CostModel, EngineLimits


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


__all__ = ["snap_depth", "snap_width", "knee_budget", "covering_budget"]


def covering_budget(budget: int, decode: list, prefill: list) -> int:
    """A token budget that runs every planned chunk: engines reserve each decode entry's full
    tree cap before prefill (sim_scheduler, embedded scheduler), so B >= sum caps + chunks."""
    need = sum(e.tree_cap for e in decode) + sum(c.tokens for c in prefill)
    return budget if budget >= need else need
