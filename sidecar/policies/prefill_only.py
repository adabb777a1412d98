"""Prefill timing for an engine that cannot mix prefill and decode in one forward.

SGLang without `--enable-mixed-chunk` runs a forward with prefill as a prefill-only forward:
no running decoder makes progress in it, so every decoder waits out the whole forward, and
the forward's fixed cost is paid once however many prompts it carries. Pricing such a
forward like a mixed iteration (decode tokens + a prefill share) gets both halves wrong: the
decode tokens are not in it, and a small chunk costs the decoders nearly as much as a whole
prompt. So, for such an engine:

- Prompts go whole and together (EDF order): one stall instead of one per prompt or chunk.
- They go now when every decoder whose next token is still reachable absorbs the forward
  plus its own next decode within its SLOs-Serve deadline (`allowance`).
- Otherwise they wait only if waiting saves someone: an endangered decoder that finishes, or
  banks enough slack (its iterations are shorter than its TPOT), within the wait the EDF
  head can afford (its TTFT deadline, keeping `keep_share` of its TTFT budget as the bank its
  own decode starts with). Waiting that saves no one only costs the newcomer its bank.
- Best-effort prompts (TTFT already lost) ride along where they fit, and otherwise wait the
  same way, at most `be_wait_s`.

Pure functions: a cost model and numbers in, token counts out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Decoders:
    """The SLO decoders a prefill-only forward stalls (parallel arrays)."""

    hard: np.ndarray
    """Seconds from the planned iteration's start to each one's next SLOs-Serve deadline."""
    tpot: np.ndarray
    """Its current TPOT, seconds."""
    left: np.ndarray
    """Output tokens it has left."""
    t_dec: float
    """One decode iteration of the running batch, seconds."""

    def allowance(self) -> float:
        """Longest prefill-only forward every decoder still able to make its next token absorbs."""
        reach = self.hard >= self.t_dec  # already behind: a shorter stall does not save it
        if not reach.any():
            return math.inf
        return float(self.hard[reach].min()) - self.t_dec

    def saved_by_waiting(self, t_forward: float, wait_s: float) -> bool:
        """Whether some decoder the forward would make miss its next token makes it if the
        forward waits up to `wait_s` (it finishes, or banks enough slack, by then)."""
        if wait_s <= 0 or not len(self.hard):
            return False
        t_dec = max(self.t_dec, 1e-6)
        need = t_forward + t_dec
        hurt = (self.hard >= t_dec) & (self.hard < need)
        if not hurt.any():
            return False
        finishes = self.left[hurt] * t_dec <= wait_s
        banks = self.hard[hurt] + (wait_s / t_dec) * (self.tpot[hurt] - t_dec) >= need
        return bool((finishes | banks).any())


def prefill_seconds(cost, tokens: int) -> float:
    """One prefill-only forward of `tokens` prompt tokens, seconds."""
    return cost.iteration_time(tokens, 0, 0, 0)


def prefill_within(cost, seconds: float, max_tokens: int) -> int:
    """Most prompt tokens (<= max_tokens) one prefill-only forward runs within `seconds`."""
    if seconds == math.inf:
        return max_tokens
    if max_tokens <= 0 or prefill_seconds(cost, 1) > seconds:
        return 0
    lo, hi = 1, max_tokens
    while lo < hi:  # largest n with prefill_seconds(n) <= seconds (monotone in n)
        mid = (lo + hi + 1) // 2
        if prefill_seconds(cost, mid) <= seconds:
            lo = mid
        else:
            hi = mid - 1
    return lo


def slo_room(cost, max_tokens: int, sizes: list[int], head_wait_s: float, dec: Decoders | None) -> tuple[int, float]:
    """(prompt tokens, seconds) of the next prefill-only forward for admitted SLO prompts of
    `sizes` tokens (EDF order); head_wait_s: how long the EDF head may still wait."""
    if not sizes:
        return 0, 0.0
    total = min(sum(sizes), max_tokens)
    t_all = prefill_seconds(cost, total)
    allow = dec.allowance() if dec is not None else math.inf
    if t_all <= allow or not dec.saved_by_waiting(t_all, head_wait_s):
        return total, t_all
    # waiting saves a decoder: only what every decoder absorbs goes now
    room, t_room = 0, 0.0
    for n in sizes:  # the longest EDF prefix of whole prompts
        if room + n > max_tokens:
            break
        t = prefill_seconds(cost, room + n)
        if t > allow:
            break
        room, t_room = room + n, t
    return room, t_room


def best_effort_room(cost, max_tokens: int, sizes: list[int], used: int, dec: Decoders | None,
                     be_wait_s: float) -> int:
    """Total prompt tokens of the forward once best-effort prompts of `sizes` tokens (in
    order) join the `used` tokens the SLO prompts take: whole prompts that keep the forward
    within the decoders' allowance; if none fits and no SLO prompt goes, the first one anyway
    unless waiting (at most be_wait_s) saves a decoder."""
    allow = dec.allowance() if dec is not None else math.inf
    total = used
    for n in sizes:
        if total + n > max_tokens or prefill_seconds(cost, total + n) > allow:
            break
        total += n
    if total == used == 0 and sizes:
        first = min(sizes[0], max_tokens)
        if dec is None or not dec.saved_by_waiting(prefill_seconds(cost, first), be_wait_s):
            total = first
    return total


__all__ = ["Decoders", "best_effort_room", "prefill_seconds", "prefill_within", "slo_room"]
