"""SLOs-Serve admission control: a DP over EDF-sorted requests with Pareto pruning.

Candidates are sorted by deadline (TTFT deadline for requests still to prefill, `now` for
running decoders). Walking that order, time advances from one deadline to the next and every
partial schedule earns prefill credit at the rate its accepted set leaves free
(`rate_of(tier_counts)`, prefill tokens per second next to the accepted requests' decode
load, as the tier planner computes it). Accepting a candidate spends its remaining prefill
tokens from the credit and its KV from the memory limit.

A subset is feasible when, for every accepted *new* candidate, the credit is >= 0 right
after paying for it and the memory stays <= the limit, and the final accepted set's decode
load is sustainable (`rate_of(final counts) >= 0`). Forced (already running) candidates are
always in the set; they consume credit and may drive it negative, which then blocks new ones.

DP state per tier-count vector: Pareto set of (profit, mem, credit); a state dominates another
with the same counts if profit >=, mem <= and credit >=. That dominance is exact (the future
depends only on counts, credit and memory), so the DP returns the optimum of brute force.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Sequence

RateOf = Callable[[tuple[int, ...]], float]  # tier counts -> prefill tokens / second


@dataclass(frozen=True, slots=True)
class Candidate:
    """One request as the admission DP sees it."""

    deadline_s: float
    """EDF key: TTFT deadline (prefill pending) or `now` (decoding), seconds."""
    prefill_tokens: int
    """Prompt tokens still to prefill."""
    mem_tokens: int
    """KV tokens it will newly occupy (0 for requests already holding theirs)."""
    tier: int
    """Index of its TPOT tier."""
    profit: float = 1.0
    """Value of serving it under its SLO."""
    forced: bool = False
    """Already admitted: must stay admitted."""


@dataclass(frozen=True, slots=True)
class Admission:
    admitted: tuple[bool, ...]
    """Per candidate (input order): accepted."""
    profit: float
    """Total profit of the accepted set."""


def _edf_order(cands: Sequence[Candidate]) -> list[int]:
    return sorted(range(len(cands)), key=lambda i: (cands[i].deadline_s, i))


def is_feasible(
    cands: Sequence[Candidate], chosen: Sequence[bool], now_s: float, mem_limit: int, rate_of: RateOf, n_tiers: int
) -> bool:
    """The feasibility rule of the module docstring for one subset (forced ones are added)."""
    t, credit, mem = now_s, 0.0, 0
    counts = [0] * n_tiers
    any_new = False
    for i in _edf_order(cands):
        c = cands[i]
        if c.deadline_s > t:
            credit += rate_of(tuple(counts)) * (c.deadline_s - t)
            t = c.deadline_s
        if not (chosen[i] or c.forced):
            continue
        credit -= c.prefill_tokens
        mem += c.mem_tokens
        counts[c.tier] += 1
        if not c.forced:
            any_new = True
            if credit < -1e-9 or mem > mem_limit:
                return False
    return not any_new or rate_of(tuple(counts)) >= 0


def admit_dp(
    cands: Sequence[Candidate], now_s: float, mem_limit: int, rate_of: RateOf, n_tiers: int
) -> Admission:
    """Most profitable feasible set containing every forced candidate (see module docstring)."""
    order = _edf_order(cands)
    rate_cache: dict[tuple[int, ...], float] = {}

    def rate(counts: tuple[int, ...]) -> float:
        r = rate_cache.get(counts)
        if r is None:
            r = rate_cache[counts] = rate_of(counts)
        return r

    # counts -> list of (profit, mem, credit, any_new, chosen-indices tuple-linked list)
    zero = (0,) * n_tiers
    layers: dict[tuple[int, ...], list[tuple[float, int, float, bool, object]]] = {zero: [(0.0, 0, 0.0, False, None)]}
    t = now_s
    for i in order:
        c = cands[i]
        if c.deadline_s > t:
            dt = c.deadline_s - t
            t = c.deadline_s
            layers = {
                k: [(p, m, cr + rate(k) * dt, a, b) for p, m, cr, a, b in states] for k, states in layers.items()
            }
        nxt: dict[tuple[int, ...], list] = {} if c.forced else {k: list(v) for k, v in layers.items()}
        for k, states in layers.items():
            k2 = k[: c.tier] + (k[c.tier] + 1,) + k[c.tier + 1 :]
            for p, m, cr, a, b in states:
                cr2, m2 = cr - c.prefill_tokens, m + c.mem_tokens
                if not c.forced and (cr2 < -1e-9 or m2 > mem_limit):
                    continue
                nxt.setdefault(k2, []).append((p + c.profit, m2, cr2, a or not c.forced, (i, b)))
        layers = {k: _pareto(v) for k, v in nxt.items() if v}
    best: tuple[float, object] | None = None
    for k, states in layers.items():
        ok_rate = rate(k) >= 0
        for p, m, cr, a, b in states:
            if a and not ok_rate:
                continue
            if best is None or p > best[0] + 1e-12:
                best = (p, b)
    chosen = [False] * len(cands)
    profit = 0.0
    if best is not None:
        profit, link = best
        while link is not None:
            idx, link = link  # type: ignore[misc]
            chosen[idx] = True
    else:  # only reachable if forced ones alone fail the final rate check: keep just them
        for i, c in enumerate(cands):
            chosen[i] = c.forced
        profit = sum(c.profit for c in cands if c.forced)
    return Admission(tuple(chosen), profit)


def _pareto(states: list) -> list:
    """Drop states dominated (profit >=, mem <=, credit >=) by another with the same counts."""
    if len(states) <= 1:
        return states
    states.sort(key=lambda s: (-s[0], s[1], -s[2]))
    kept: list = []
    for s in states:
        if any(q[0] >= s[0] and q[1] <= s[1] and q[2] >= s[2] for q in kept):
            continue
        kept.append(s)
    return kept


def admit_brute_force(
    cands: Sequence[Candidate], now_s: float, mem_limit: int, rate_of: RateOf, n_tiers: int
) -> Admission:
    """Reference: enumerate every subset of the new candidates (exponential; tests only)."""
    new = [i for i, c in enumerate(cands) if not c.forced]
    best = Admission(tuple(c.forced for c in cands), sum(c.profit for c in cands if c.forced))
    best_new = -1.0
    for bits in itertools.product((False, True), repeat=len(new)):
        chosen = [c.forced for c in cands]
        for i, b in zip(new, bits):
            chosen[i] = b
        if not any(bits) or not is_feasible(cands, chosen, now_s, mem_limit, rate_of, n_tiers):
            continue
        p = sum(c.profit for c, x in zip(cands, chosen) if x)
        if p - sum(c.profit for c in cands if c.forced) > best_new + 1e-12:
            best_new = p - sum(c.profit for c in cands if c.forced)
            best = Admission(tuple(chosen), p)
    return best


__all__ = ["Candidate", "Admission", "RateOf", "admit_dp", "admit_brute_force", "is_feasible"]
