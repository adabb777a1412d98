"""SpecServe/AdaSpec: choose the batch speculation length by efficiency, then trim per request.

Efficiency of proposal length k (papers.md section 2.2):

    E_i(k) = sum_{j=1..k} prod_{l<=j} c_{i,l}        expected accepted drafts of request i
    G(k)   = (sum_i E_i(k_i) + n) / T(k)             committed tokens per second

k = 0 (speculation off) is a candidate. The SLO guard rejects any k whose predicted
iteration time exceeds the tightest TPOT. After k is chosen, the verifier trims the
lowest-confidence tail tokens across the batch as long as G does not fall (AdaSpec's
confidence-prior verifier; we trim token by token instead of to CUDA-graph sizes).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable, Sequence

# time_of(verify_tokens, draft_steps) -> seconds of the iteration (prefill part fixed inside).
TimeOf = Callable[[int, int], float]


def cumulative(alphas: Sequence[float], k: int) -> list[float]:
    """Path probabilities prod_{l<=j} alpha_l for j = 1..k (alphas repeat the last entry)."""
    out, run = [], 1.0
    last = alphas[-1] if alphas else 0.0
    for j in range(k):
        run *= alphas[j] if j < len(alphas) else last
        out.append(run)
    return out


@dataclass(frozen=True, slots=True)
class SpecChoice:
    k: int
    """Batch proposal length (0 = speculation off)."""
    lengths: tuple[int, ...]
    """Per-request draft length after trimming (<= k)."""
    expected_accepted: tuple[float, ...]
    """Per-request expected accepted drafts E_i(k_i)."""
    goodput: float
    """Predicted committed tokens per second."""
    time_s: float
    """Predicted iteration time, seconds."""


def choose_length(
    alphas: Sequence[Sequence[float]],
    time_of: TimeOf,
    k_max: int,
    tpot_guard_s: float = float("inf"),
    trim: bool = True,
    allowed: Sequence[int] | None = None,
) -> SpecChoice:
    """Best k in {0..k_max} (or `allowed`) by G(k) under the SLO guard, then per-request trim.

    alphas: per request, per-position conditional acceptance; time_of(verify, steps) -> s.
    When every k > 0 violates the guard, k = 0 is taken (it is the fastest).
    """
    n = len(alphas)
    ks = sorted({0, *(k for k in (allowed if allowed is not None else range(k_max + 1)) if 0 <= k <= k_max)})
    cums = [cumulative(a, ks[-1]) for a in alphas]
    best: tuple[float, int, float] | None = None  # (goodput, k, time)
    for k in ks:
        t = time_of(n * (k + 1), k)
        if k > 0 and t > tpot_guard_s:
            continue
        tokens = n + sum(sum(c[:k]) for c in cums)
        g = tokens / t if t > 0 else 0.0
        if best is None or g > best[0] * (1 + 1e-9):
            best = (g, k, t)
    assert best is not None  # k = 0 is never guarded out
    g, k, t = best
    lengths = [k] * n
    if trim and k > 0 and n > 0:
        lengths, g, t = _trim(cums, lengths, k, time_of, g, t, n)
    exp = tuple(sum(c[:l]) for c, l in zip(cums, lengths))
    return SpecChoice(k, tuple(lengths), exp, g, t)


def _trim(cums, lengths, k, time_of, g, t, n):
    """Drop tail drafts with the lowest path probability while goodput does not fall."""
    heap = [(c[l - 1], i) for i, (c, l) in enumerate(zip(cums, lengths)) if l > 0]
    heapq.heapify(heap)
    hist = [0] * (k + 1)  # hist[l] = requests with draft length l
    for l in lengths:
        hist[l] += 1
    top = k
    tokens = n + sum(sum(c[:l]) for c, l in zip(cums, lengths))
    verify = sum(lengths) + n
    while heap:
        p, i = heapq.heappop(heap)
        l = lengths[i]
        steps = top if (l < top or hist[top] > 1) else top - 1
        t2 = time_of(verify - 1, steps)
        g2 = (tokens - p) / t2 if t2 > 0 else 0.0
        if g2 < g:
            break
        lengths[i] = l - 1
        hist[l] -= 1
        hist[l - 1] += 1
        while top > 0 and hist[top] == 0:
            top -= 1
        tokens -= p
        verify -= 1
        g, t = g2, t2
        if l > 1:
            heapq.heappush(heap, (cums[i][l - 2], i))
    return lengths, g, t


__all__ = ["cumulative", "SpecChoice", "choose_length", "TimeOf"]
