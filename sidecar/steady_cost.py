"""GPU seconds a request costs in steady state with ideal batching (shared by the planner's
overload shedding and eval/ceiling.py).

    prefill     every prompt token not prefix-cached at the cost model's marginal (above-knee)
                slope, plus its causal attention (k_pf2 * n^2).
    decode      every output token in the largest decode batch whose iteration keeps the
                tightest class's pace (mean E_c(k) * tpot_c), at the best chain depth k (one
                for all; batch composition by each request's share of decode iterations).

No prefill/decode interference, bursts, KV limits or queueing: optimistic, so a capacity
derived from it is a ceiling.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

from sidecar.acceptance import chain_expected
from sidecar.cost_model import CostModel

MAX_BATCH = 4096
"""Largest decode batch (requests) considered."""


@dataclass(frozen=True, slots=True)
class DecodeItem:
    """One request (or one class, weighted by its rate) of the decode mix."""

    alphas: Sequence[float]
    """Per-position conditional acceptance of its draft."""
    output_tokens: float
    """Output tokens it decodes (expected, for a class)."""
    prompt_tokens: float
    """Prompt tokens (its KV context before decoding)."""
    tpot_s: float
    """Its TPOT (first stage), seconds."""
    slo_class: str
    weight: float = 1.0
    """How many requests it stands for (a class: its arrival rate)."""


def prefill_seconds(cost: CostModel, new_tokens: float) -> float:
    """GPU seconds of one prompt's `new_tokens` (not prefix-cached) at the marginal slope, + attention."""
    return ((cost.k_tok_s + cost.k_knee_s) * new_tokens + cost.k_pf2_s * new_tokens * new_tokens) * cost.scale


def decode_cost_per_token(cost: CostModel, items: Sequence[DecodeItem], max_depth: int) -> tuple[float, dict]:
    """GPU seconds per output token of the items' decodes with ideal batching (module
    docstring), and the batch that achieves it ({} and inf when no batch keeps the pace)."""
    best = (float("inf"), {})
    if not items:
        return best
    for k in range(max_depth + 1):
        e = [1.0 + chain_expected(list(it.alphas), k) for it in items]          # tokens per iteration
        slots = [it.weight * it.output_tokens / x for it, x in zip(items, e)]  # decode iterations
        n = sum(slots)
        if n <= 0:
            return best
        tokens_per_slot = sum(it.weight * it.output_tokens for it in items) / n
        context = sum(s * (it.prompt_tokens + it.output_tokens / 2) for it, s in zip(items, slots)) / n
        t_max = tightest_pace(items, e)

        def t_of(b: int) -> float:
            return cost.iteration_time(0, b * (k + 1), k, int(b * context), b * k, requests=b,
                                       spec_requests=b if k else 0)

        if t_of(1) > t_max:
            continue
        lo, hi = 1, MAX_BATCH  # the iteration grows with b: the largest b within t_max
        if t_of(hi) <= t_max:
            lo = hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if t_of(mid) <= t_max:
                lo = mid
            else:
                hi = mid
        t, b = t_of(lo), lo
        per_token = t / (b * tokens_per_slot)
        if per_token < best[0]:
            best = (per_token, {"depth": k, "batch": b, "iteration_ms": round(t * 1e3, 2),
                                "mean_tpot_ms": round(t / tokens_per_slot * 1e3, 2)})
    return best


def tightest_pace(items: Sequence[DecodeItem], e: Sequence[float]) -> float:
    """min over classes of the class's mean tokens per iteration x its TPOT (first stage), s."""
    by_class = defaultdict(list)
    for it, x in zip(items, e):
        by_class[it.slo_class].append((x, it.tpot_s, it.weight))
    return min(sum(x * w for x, _, w in v) / sum(w for *_, w in v) * min(t for _, t, _ in v)
               for v in by_class.values())


__all__ = ["DecodeItem", "MAX_BATCH", "decode_cost_per_token", "prefill_seconds", "tightest_pace"]
