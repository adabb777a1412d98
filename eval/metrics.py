"""SLO attainment, goodput and latency percentiles from per-request records.

One module for the simulator and the real HTTP evaluation. Two attainment definitions
(papers.md §1.8 and §3.2), both stage-aware:

- AdaServe ("adaserve"): the request finished and its mean TPOT is within the TPOT SLO;
  for multi-stage requests, the mean inter-token gap of every stage is within that stage's
  TPOT. TTFT is not targeted.
- SLOs-Serve ("slos_serve"): the request was admitted (never rejected or demoted to
  best effort), finished, its first token came by arrival + TTFT, and every token n came by
  its deadline  t0 + ttnt(n),  t0 = max(arrival + TTFT, first-token time),
  ttnt(n) = sum over tokens j = 2..n of the TPOT of the stage token j belongs to, plus the
  `ttft_s` allowance of every later stage that has started by token n. SLOs-Serve's code
  checks every 10th token; `check_every=1` (the default here) checks every token (stricter).

Rejected, cancelled and unfinished requests count as misses under both.
Goodput: SLO-meeting requests per second and their output tokens per second.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from protos.messages import Slo

DEFINITIONS = ("slos_serve", "adaserve")
_EPS = 1e-9  # seconds: float slack when comparing a time with its deadline


class Outcome(enum.Enum):
    FINISHED = "finished"
    REJECTED = "rejected"  # refused by admission control
    UNFINISHED = "unfinished"  # still running (or waiting) when the run ended
    CANCELLED = "cancelled"  # never arrived: an earlier call of its agent loop failed
    FAILED = "failed"  # engine error (e.g. longer than the KV cache)


@dataclass
class RequestRecord:
    """What happened to one request."""

    rid: str
    slo: Slo
    arrival_s: float
    """Arrival time, seconds (same clock as token_times)."""
    token_times: list[float] = field(default_factory=list)
    """Emission time of each output token, seconds (tokens of one iteration share a time)."""
    stage_starts: list[int] = field(default_factory=list)
    """0-based index of the first token of each stage that started ([] or [0] = one stage)."""
    outcome: Outcome = Outcome.UNFINISHED
    admitted: bool = True
    """False if the request ever ran as best effort by the planner's decision (SLOs-Serve miss)."""
    prompt_tokens: int = 0
    session_id: str = ""

    @property
    def slo_class(self) -> str:
        return self.slo.slo_class or "default"

    @property
    def ttft_s(self) -> float | None:
        return self.token_times[0] - self.arrival_s if self.token_times else None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first, seconds."""
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n >= 2 else None


def _stage_tpots(slo: Slo) -> list[float]:
    return [s.tpot_s for s in slo.stages] if slo.stages else [slo.tpot_s]


def _token_stage(rec: RequestRecord, n: int) -> np.ndarray:
    """[n] stage index of each output token."""
    starts = [s for s in rec.stage_starts[1:]]
    stage = np.zeros(n, dtype=np.int64)
    for s in starts:
        if s < n:
            stage[s:] += 1
    return np.minimum(stage, len(_stage_tpots(rec.slo)) - 1)


def meets_adaserve(rec: RequestRecord) -> bool:
    """Finished and mean TPOT within the SLO, per stage."""
    if rec.outcome is not Outcome.FINISHED or not rec.token_times:
        return False
    n = len(rec.token_times)
    if n < 2:
        return True
    times = np.asarray(rec.token_times)
    gaps = np.diff(times)  # [n-1] gap before token j = 2..n
    stage = _token_stage(rec, n)[1:]
    tpots = np.asarray(_stage_tpots(rec.slo))
    for s in np.unique(stage):
        if gaps[stage == s].mean() > tpots[s] + _EPS:
            return False
    return True


def meets_slos_serve(rec: RequestRecord, check_every: int = 1) -> bool:
    """Admitted, finished, TTFT met and every checked token by its stage-aware deadline."""
    if rec.outcome is not Outcome.FINISHED or not rec.admitted or not rec.token_times:
        return False
    slo = rec.slo
    times = np.asarray(rec.token_times)
    if times[0] > rec.arrival_s + slo.ttft_s + _EPS:
        return False
    n = len(times)
    t0 = max(rec.arrival_s + slo.ttft_s, times[0])
    stage = _token_stage(rec, n)
    tpots = np.asarray(_stage_tpots(slo))
    incr = np.zeros(n)
    incr[1:] = tpots[stage[1:]]
    if slo.stages:  # stage allowance, added at the first token of each later stage
        allow = np.asarray([s.ttft_s for s in slo.stages])
        first_of_stage = np.zeros(n, dtype=bool)
        first_of_stage[1:] = stage[1:] != stage[:-1]
        incr += np.where(first_of_stage, allow[stage], 0.0)
    deadline = t0 + np.cumsum(incr)
    idx = np.arange(check_every - 1, n, check_every) if check_every > 1 else slice(None)
    return bool(np.all(times[idx] <= deadline[idx] + _EPS)) and bool(times[-1] <= deadline[-1] + _EPS)


def _pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def summarize_group(recs: list[RequestRecord], elapsed_s: float, check_every: int = 1) -> dict:
    """Counts, attainment under both definitions, goodput and latency percentiles of a group."""
    n = len(recs)
    ok_ss = [r for r in recs if meets_slos_serve(r, check_every)]
    ok_ad = [r for r in recs if meets_adaserve(r)]
    ttfts = [r.ttft_s for r in recs if r.ttft_s is not None]
    tpots = [r.tpot_s for r in recs if r.tpot_s is not None]
    count = lambda o: sum(r.outcome is o for r in recs)  # noqa: E731
    el = max(elapsed_s, 1e-9)
    return {
        "requests": n,
        "finished": count(Outcome.FINISHED),
        "rejected": count(Outcome.REJECTED),
        "unfinished": count(Outcome.UNFINISHED),
        "cancelled": count(Outcome.CANCELLED),
        "failed": count(Outcome.FAILED),
        "demoted": sum(not r.admitted for r in recs),
        "attainment_slos_serve": len(ok_ss) / n if n else None,
        "attainment_adaserve": len(ok_ad) / n if n else None,
        "goodput_rps": len(ok_ss) / el,
        "goodput_tps": sum(len(r.token_times) for r in ok_ss) / el,
        "goodput_rps_adaserve": len(ok_ad) / el,
        "goodput_tps_adaserve": sum(len(r.token_times) for r in ok_ad) / el,
        "throughput_tps": sum(len(r.token_times) for r in recs) / el,
        "ttft_p50_s": _pct(ttfts, 50),
        "ttft_p99_s": _pct(ttfts, 99),
        "tpot_p50_s": _pct(tpots, 50),
        "tpot_p99_s": _pct(tpots, 99),
    }


def summarize_sessions(recs: list[RequestRecord], check_every: int = 1) -> dict:
    """Agent loops (records sharing a session id): a session meets its SLOs iff every call does."""
    by_session: dict[str, list[RequestRecord]] = {}
    for r in recs:
        if r.session_id:
            by_session.setdefault(r.session_id, []).append(r)
    n = len(by_session)
    ok_ss = sum(all(meets_slos_serve(r, check_every) for r in rs) for rs in by_session.values())
    ok_ad = sum(all(meets_adaserve(r) for r in rs) for rs in by_session.values())
    return {"sessions": n, "calls": sum(len(rs) for rs in by_session.values()),
            "attainment_slos_serve": ok_ss / n if n else None, "attainment_adaserve": ok_ad / n if n else None}


def summarize(records: Iterable[RequestRecord], elapsed_s: float, check_every: int = 1) -> dict:
    """{"overall": {...}, "classes": {slo_class: {...}}, "sessions": {...}}.

    overall/classes: see `summarize_group`; sessions: see `summarize_sessions`.
    elapsed_s: the run's length in seconds (goodput denominators)."""
    recs = list(records)
    by_class: dict[str, list[RequestRecord]] = {}
    for r in recs:
        by_class.setdefault(r.slo_class, []).append(r)
    return {
        "overall": summarize_group(recs, elapsed_s, check_every),
        "classes": {c: summarize_group(rs, elapsed_s, check_every) for c, rs in sorted(by_class.items())},
        "sessions": summarize_sessions(recs, check_every),
    }
