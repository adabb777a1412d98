"""SLOs-Serve's speculative-decoding batch planner: one speculation length per TPOT tier.

Chains with a global per-token acceptance alpha. A request verifying `sl` tokens per batch
(root + sl - 1 drafts) commits Acc(sl) = (1 - alpha^sl) / (1 - alpha) tokens in expectation.
Enumerate the bottleneck tier i and its length j; every other tier k gets the smallest sl_k
that keeps pace with the batch period set by tier i:

    sl_k = ceil( log( ((tau_k - tau_i) + alpha^j * tau_i) / tau_k ) / log alpha )

    i.e. the smallest sl with Acc(sl) >= Acc(j) * tau_i / tau_k.
Batch period T = min_k floor(Acc(sl_k)) * tau_k; the per-batch prefill budget is
time_to_batch(T, max_k sl_k) - sum_k n_k * sl_k. The (i, j) with the largest prefill rate
(budget / T) wins; with no prefill pending, the largest decode rate.
(papers.md section 3.4.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

# time_to_batch(seconds, draft_steps) -> most batch tokens that fit in `seconds`.
TimeToBatch = Callable[[float, int], int]


def acc(sl: int, alpha: float) -> float:
    """Expected committed tokens of a chain verifying `sl` tokens (root included)."""
    if sl <= 0:
        return 0.0
    if alpha >= 1.0:
        return float(sl)
    if alpha <= 0.0:
        return 1.0
    return (1.0 - alpha**sl) / (1.0 - alpha)


def tier_length(tau_k: float, tau_i: float, j: int, alpha: float, max_len: int) -> int:
    """Smallest sl in [1, max_len] keeping tier k (TPOT tau_k) on pace with tier i at length j.

    Closed form of SLOs-Serve; returns max_len + 1 when no sl <= max_len keeps pace.
    """
    if tau_k <= 0 or tau_i <= 0 or j <= 0:
        raise ValueError("tier TPOTs and j must be positive")
    need = acc(j, alpha) * tau_i / tau_k  # tokens tier k must commit per batch
    if need <= 1.0 + 1e-12:
        return 1
    if alpha <= 0.0:
        return max_len + 1
    if alpha >= 1.0:
        sl = math.ceil(need - 1e-12)
        return sl if sl <= max_len else max_len + 1
    arg = ((tau_k - tau_i) + alpha**j * tau_i) / tau_k
    if arg <= 0.0:
        return max_len + 1  # Acc(sl) < 1/(1-alpha) bound: unreachable at any length
    sl = math.ceil(math.log(arg) / math.log(alpha) - 1e-9)
    sl = max(1, sl)
    # Guard against float rounding at exact boundaries.
    while sl > 1 and acc(sl - 1, alpha) >= need - 1e-12:
        sl -= 1
    while sl <= max_len and acc(sl, alpha) < need - 1e-12:
        sl += 1
    return sl if sl <= max_len else max_len + 1


@dataclass(frozen=True, slots=True)
class TierPlan:
    """One batch shape of the SD planner."""

    lengths: tuple[int, ...]
    """Verify tokens per request (root + drafts) of each tier, in input tier order."""
    period_s: float
    """Batch period T, seconds."""
    prefill_per_batch: int
    """Prefill tokens that fit in each batch next to the decode tokens."""
    decode_tokens: int
    """Verify tokens of all decoding requests in each batch (sum_k n_k * sl_k)."""
    bottleneck: int
    """Index of the bottleneck tier (-1 when there are no decoding requests)."""

    @property
    def prefill_rate(self) -> float:
        """Prefill tokens per second."""
        return self.prefill_per_batch / self.period_s if self.period_s > 0 else 0.0


def plan_tiers(
    tiers: Sequence[tuple[float, int]],
    alpha: float,
    max_len: int,
    time_to_batch: TimeToBatch,
    prefer_prefill: bool = True,
    idle_period_s: float = 0.05,
) -> TierPlan:
    """Best per-tier speculation lengths.

    tiers: (tpot_s, n_requests) per TPOT tier; max_len: most verify tokens per request
    (1 = no speculation); time_to_batch(T, draft_steps) -> tokens. Returns the plan with
    the largest prefill rate (prefer_prefill) or decode rate; the prefill budget may be
    negative when the tiers cannot all be kept on pace. With no decoding requests, one
    `idle_period_s` batch of pure prefill.
    """
    tiers = [(float(t), int(c)) for t, c in tiers if c > 0]
    max_len = max(1, int(max_len))
    if not tiers:
        return TierPlan((), idle_period_s, time_to_batch(idle_period_s, 0), 0, -1)
    best: TierPlan | None = None
    best_key = -math.inf
    for i, (tau_i, _) in enumerate(tiers):
        for j in range(1, max_len + 1):
            lengths = tuple(min(max_len, tier_length(tau_k, tau_i, j, alpha, max_len)) for tau_k, _ in tiers)
            period = min(math.floor(acc(sl, alpha) + 1e-9) * tau for sl, (tau, _) in zip(lengths, tiers))
            steps = max(lengths) - 1
            decode = sum(sl * c for sl, (_, c) in zip(lengths, tiers))
            prefill = time_to_batch(period, steps) - decode
            plan = TierPlan(lengths, period, prefill, decode, i)
            if prefer_prefill:
                key = prefill / period
            else:
                committed = sum(acc(sl, alpha) * c for sl, (_, c) in zip(lengths, tiers))
                key = committed / period if prefill >= 0 else -1.0 / period + prefill
            if key > best_key + 1e-12:
                best, best_key = plan, key
    assert best is not None
    return best


class TierPlanner:
    """`plan_tiers` with the count-independent part cached: per set of non-empty tiers, the
    candidate shapes (lengths, period, draft steps) of every (bottleneck i, length j).

    `best(counts)` then costs one time_to_batch call per shape, which makes the admission DP
    (thousands of count vectors) affordable.
    """

    def __init__(self, taus: Sequence[float], alpha: float, max_len: int, idle_period_s: float = 0.05):
        self.taus = tuple(float(t) for t in taus)
        self.alpha = alpha
        self.max_len = max(1, int(max_len))
        self.idle_period_s = idle_period_s
        self._shapes: dict[tuple[int, ...], list[tuple[int, tuple[int, ...], float, int]]] = {}

    def shapes(self, active: tuple[int, ...]) -> list[tuple[int, tuple[int, ...], float, int]]:
        """(bottleneck tier, lengths over `active`, period_s, draft steps) per candidate."""
        out = self._shapes.get(active)
        if out is None:
            a, S, taus = self.alpha, self.max_len, self.taus
            out = []
            for i in active:
                for j in range(1, S + 1):
                    lengths = tuple(min(S, tier_length(taus[k], taus[i], j, a, S)) for k in active)
                    period = min(math.floor(acc(sl, a) + 1e-9) * taus[k] for sl, k in zip(lengths, active))
                    out.append((i, lengths, period, max(lengths) - 1))
            self._shapes[active] = out
        return out

    def best(self, counts: Sequence[int], time_to_batch: TimeToBatch, prefer_prefill: bool = True) -> TierPlan:
        """Same answer as plan_tiers(zip(taus, counts), ...) (lengths of empty tiers are 1)."""
        active = tuple(k for k, c in enumerate(counts) if c > 0)
        if not active:
            p = self.idle_period_s
            return TierPlan((1,) * len(self.taus), p, time_to_batch(p, 0), 0, -1)
        best: TierPlan | None = None
        best_key = -math.inf
        a = self.alpha
        for i, lengths, period, steps in self.shapes(active):
            decode = sum(sl * counts[k] for sl, k in zip(lengths, active))
            prefill = time_to_batch(period, steps) - decode
            if prefer_prefill:
                key = prefill / period
            else:
                committed = sum(acc(sl, a) * counts[k] for sl, k in zip(lengths, active))
                key = committed / period if prefill >= 0 else -1.0 / period + prefill
            if key > best_key + 1e-12:
                full = [1] * len(self.taus)
                for sl, k in zip(lengths, active):
                    full[k] = sl
                best, best_key = TierPlan(tuple(full), period, prefill, decode, i), key
        assert best is not None
        return best


__all__ = ["acc", "tier_length", "TierPlan", "plan_tiers", "TierPlanner", "TimeToBatch"]
