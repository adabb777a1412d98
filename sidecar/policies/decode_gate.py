"""Decode-capacity admission: admit only the requests whose decode the batch can carry.

TTFT feasibility (edf_admission.py) says whether a prompt can be prefilled in time; it does
not say whether the batch can then keep every decoder on its TPOT. A batch of decoders is on
pace when one iteration is no longer than the tightest E_i * tpot_i (request i commits E_i
expected tokens per iteration and must average one token per tpot_i). Each admitted request
makes every iteration longer (its verify tokens and its KV reads), and the prompts still to
come take a share of the GPU's time (the prefill duty). Past the point where the batch no
longer keeps pace, admitting one more request makes *every* decoder late; declining it (it
waits, and runs best effort once its TTFT is lost) keeps the rest on their SLOs.

Pure: a cost model and numbers in, which candidates fit out. O(candidates) cost-model calls.
`ArrivalRate` estimates the prompt tokens arriving per second behind the prefill duty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True, slots=True)
class GateLoad:
    """The decode batch the gate adds candidates to."""

    nodes: int
    """Verify tokens per iteration (roots included)."""
    seqs: int
    """Decoding requests."""
    context: int
    """KV tokens the decoders read per iteration."""
    steps: int
    """Draft steps per iteration."""


@dataclass(frozen=True, slots=True)
class GateCandidate:
    nodes: int
    """Verify tokens per iteration it will add once decoding."""
    context: int
    """KV tokens it will add (prompt + about half its output), tokens."""
    pace_s: float
    """Its own E * tpot: the longest iteration it tolerates, seconds."""


def pace_limit(iteration_s: float, duty: float) -> float:
    """Wall time per decode iteration when `duty` of the GPU goes to prefill (0 <= duty < 1)."""
    return iteration_s / (1.0 - duty) if duty < 0.95 else iteration_s * 20.0


def admit_decodes(cost, load: GateLoad, t_allow_s: float, duty: float,
                  candidates: Sequence[GateCandidate]) -> list[bool]:
    """Which candidates (in the given order) keep the projected iteration, stretched by the
    prefill duty, within the tightest pace of the batch and of the candidates admitted so far
    (t_allow_s: the current decoders' tightest E_i * tpot_i, already with any safety share).
    A candidate that does not fit is skipped; a later, smaller one may still fit. A pace no
    batch could keep is no constraint: the batch's when even an iteration of the candidate's
    tokens without any context exceeds it (the engine's floor), the candidate's own when even
    it alone exceeds it. Declining then would save no one, just idle the engine."""
    nodes, seqs, ctx = load.nodes, load.seqs, load.context
    limit = t_allow_s
    floors: dict[int, float] = {}  # candidate nodes -> the engine's floor (candidates share sizes)
    out = []
    for c in candidates:
        t_floor = floors.get(c.nodes)
        if t_floor is None:
            t_floor = floors[c.nodes] = pace_limit(cost.iteration_time(0, c.nodes, load.steps, 0, c.nodes - 1), duty)
        lim_c = limit if t_floor <= limit else math.inf
        if c.pace_s < lim_c and pace_limit(cost.iteration_time(0, c.nodes, load.steps, c.context, c.nodes - 1),
                                           duty) <= c.pace_s:
            lim_c = c.pace_s
        n, s, x = nodes + c.nodes, seqs + 1, ctx + c.context
        t = pace_limit(cost.iteration_time(0, n, load.steps, x, n - s), duty)
        ok = t <= lim_c
        out.append(ok)
        if ok:
            nodes, seqs, ctx, limit = n, s, x, min(limit, c.pace_s)  # the tightest pace in the batch
    return out


class ArrivalRate:
    """Exponentially decayed rate of prompt tokens arriving (new, not prefix-cached), tokens/s."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self._level = 0.0  # decayed token count
        self._t = 0.0

    def add(self, t: float, tokens: int) -> None:
        self._decay(t)
        self._level += tokens

    def rate(self, t: float) -> float:
        self._decay(t)
        return self._level / self.window_s

    def _decay(self, t: float) -> None:
        if t > self._t:
            self._level *= math.exp(-(t - self._t) / self.window_s)
            self._t = t


__all__ = ["ArrivalRate", "GateCandidate", "GateLoad", "admit_decodes", "pace_limit"]
