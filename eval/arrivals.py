"""Arrival processes: when sessions/requests arrive, as sorted times in seconds from 0.

- `poisson`: exponential gaps at `rate` (requests/s).
- `gamma`: gamma renewal with shape k = `burstiness` and scale 1/(rate*k): the mean gap is
  1/rate and the gap CV is 1/sqrt(k) (vLLM's `--burstiness`; k=1 is Poisson, 0.1 is very bursty).
- `onoff`: a 2-state Markov-modulated Poisson process: ON periods at `rate * on_factor`,
  OFF periods at `rate * off_factor`, exponential period lengths (mean `on_s` / `off_s`);
  the factors are rescaled so that the long-run mean rate is `rate`.
"""

from __future__ import annotations

import msgspec
import numpy as np


class ArrivalSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """How arrivals are spaced; the mean rate is given separately (`--rate`)."""

    process: str = "poisson"
    """One of: poisson, gamma, onoff."""
    burstiness: float = 1.0
    """gamma only: shape k of the gap distribution (gap CV = 1/sqrt(k))."""
    on_s: float = 10.0
    """onoff only: mean length of a burst period, seconds."""
    off_s: float = 20.0
    """onoff only: mean length of a quiet period, seconds."""
    on_factor: float = 4.0
    """onoff only: rate multiplier during bursts, relative to the quiet rate (before rescaling)."""

    def __post_init__(self) -> None:
        if self.process not in PROCESSES:
            raise ValueError(f"arrival process {self.process!r} not one of {sorted(PROCESSES)}")
        if self.burstiness <= 0 or self.on_s <= 0 or self.off_s <= 0 or self.on_factor <= 0:
            raise ValueError("burstiness, on_s, off_s and on_factor must be positive")


def arrival_times(spec: ArrivalSpec, rate: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted arrival times in [0, duration_s), seconds, for a mean rate `rate` (per second)."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError(f"rate ({rate}) and duration ({duration_s}) must be positive")
    return PROCESSES[spec.process](spec, rate, duration_s, rng)


def _renewal(gaps_fn, rate: float, duration_s: float) -> np.ndarray:
    n = int(rate * duration_s * 1.5) + 16
    times = np.cumsum(gaps_fn(n))
    while times[-1] < duration_s:  # rare: draw more
        times = np.concatenate([times, times[-1] + np.cumsum(gaps_fn(n))])
    return times[times < duration_s]


def _poisson(spec: ArrivalSpec, rate: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    return _renewal(lambda n: rng.exponential(1.0 / rate, n), rate, duration_s)


def _gamma(spec: ArrivalSpec, rate: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    k = spec.burstiness
    return _renewal(lambda n: rng.gamma(k, 1.0 / (rate * k), n), rate, duration_s)


def _onoff(spec: ArrivalSpec, rate: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    # long-run mean = (on_s*hi + off_s*lo)/(on_s+off_s) = rate, with hi = on_factor*lo
    lo = rate * (spec.on_s + spec.off_s) / (spec.on_s * spec.on_factor + spec.off_s)
    hi = lo * spec.on_factor
    out: list[float] = []
    t, on = 0.0, bool(rng.random() < spec.on_s / (spec.on_s + spec.off_s))
    while t < duration_s:
        period = rng.exponential(spec.on_s if on else spec.off_s)
        end = min(t + period, duration_s)
        lam = hi if on else lo
        s = t + rng.exponential(1.0 / lam)
        while s < end:
            out.append(s)
            s += rng.exponential(1.0 / lam)
        t, on = end, not on
    return np.asarray(out)


PROCESSES = {"poisson": _poisson, "gamma": _gamma, "onoff": _onoff}
