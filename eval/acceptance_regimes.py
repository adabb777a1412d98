"""True speculative acceptance of simulated requests (reference workloads-and-calibration §3.1).

A regime is a per-position *conditional* acceptance vector for chain drafts: alpha[i] is the
probability that draft position i+1 is accepted given positions 1..i were. Each request gets
its own vector: the regime's, shifted by a task adjustment and by a per-request offset drawn
from a Beta distribution (mean = the regime's alpha_1, sd ~0.1): acceptance is context
dependent, so it varies from request to request but is correlated across positions.
"""

from __future__ import annotations

import numpy as np

# alpha_1 .. alpha_6 (alpha_6 repeats for deeper positions)
REGIMES: dict[str, tuple[float, ...]] = {
    "eagle3_strong": (0.85, 0.82, 0.80, 0.78, 0.76, 0.75),  # paper-grade EAGLE-3, code/math, T=0
    "eagle2_chat": (0.80, 0.76, 0.74, 0.72, 0.71, 0.70),  # EAGLE-2/1 on chat, T=0
    "eagle3_public_t1": (0.70, 0.66, 0.64, 0.62, 0.60, 0.60),  # public EAGLE-3 checkpoint, T=1
    "small_draft_chat": (0.60, 0.55, 0.52, 0.50, 0.50, 0.50),  # independent 68M-1B draft on chat
    "reasoning_t1": (0.58, 0.53, 0.52, 0.50, 0.50, 0.50),  # gpt-oss + EAGLE-3 reasoning, T=1
}

POSITIONS = 8  # length of each request's alpha vector (deepest draft the simulator models)
_ALPHA_MIN, _ALPHA_MAX = 0.02, 0.98


def request_alphas(regime: str, shift: float, sigma: float, rng: np.random.Generator) -> list[float]:
    """Per-position true conditional acceptance of one request ([POSITIONS] floats in (0, 1))."""
    if regime not in REGIMES:
        raise ValueError(f"acceptance regime {regime!r} not one of {sorted(REGIMES)}")
    base = np.array(REGIMES[regime] + (REGIMES[regime][-1],) * (POSITIONS - len(REGIMES[regime])))
    base = np.clip(base + shift, _ALPHA_MIN, _ALPHA_MAX)
    offset = 0.0
    if sigma > 0:
        m = float(base[0])
        conc = max(m * (1 - m) / sigma**2 - 1.0, 1.0)  # a + b of a Beta with this mean and sd
        offset = rng.beta(m * conc, (1 - m) * conc) - m
    return [float(a) for a in np.clip(base + offset, _ALPHA_MIN, _ALPHA_MAX)]


def expected_accept_length(alphas: list[float], depth: int) -> float:
    """tau: expected committed tokens per verify of a chain of `depth` (bonus token included)."""
    tau, p = 1.0, 1.0
    for i in range(depth):
        p *= alphas[min(i, len(alphas) - 1)]
        tau += p
    return tau
