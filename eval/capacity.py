"""Capacity: the highest arrival rate at which a policy keeps SLO attainment >= a target.

Bracket by doubling/halving from a start rate, then bisect (same seed at every rate, so the
workloads are nested draws of the same generator). The DistServe/SLOs-Serve convention is
attainment >= 90%.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from eval.compare import make_workload
from eval.metrics import summarize
from eval.simulator import SimConfig, simulate


@dataclass
class CapacityResult:
    policy: str
    rate: float
    """Highest rate found that met the target (0 if even `min_rate` failed), arrivals/s."""
    attainment: float | None
    """Attainment at `rate`."""
    probes: list[tuple[float, float]] = field(default_factory=list)
    """(rate, attainment) of every simulation run, in order."""


def find_capacity(workload: str, hardware: str | Path, policy: str, *, target: float = 0.9,
                  definition: str = "slos_serve", start_rate: float = 2.0, min_rate: float = 0.05,
                  max_rate: float = 256.0, duration_s: float = 30.0, seed: int = 0, rel_tol: float = 0.05,
                  max_probes: int = 12, config: SimConfig = SimConfig(), max_context: int | None = None,
                  scale_slos: bool = False, policy_overrides: dict | None = None,
                  seeds: int = 1) -> CapacityResult:
    """Bisection over the arrival rate for `policy` on `workload` (attainment by `definition`).

    seeds: workloads seed, seed + 1, ... are simulated at every rate and their attainments
    averaged (less noise from one draw of arrivals and lengths, at that many times the cost)."""
    if definition not in ("slos_serve", "adaserve"):
        raise ValueError("definition must be slos_serve or adaserve")
    if not 0 < target <= 1 or not 0 < min_rate <= start_rate <= max_rate or seeds < 1:
        raise ValueError("need 0 < target <= 1, 0 < min_rate <= start_rate <= max_rate and seeds >= 1")
    out = CapacityResult(policy, 0.0, None)
    key = f"attainment_{definition}"

    def attain(rate: float) -> float:
        total = 0.0
        for s in range(seed, seed + seeds):
            w = make_workload(workload, hardware, rate=rate, duration_s=duration_s, seed=s, max_context=max_context,
                              scale_slos=scale_slos)
            res = simulate(w, hardware, policy, seed=s, config=config, policy_overrides=policy_overrides)
            total += summarize(res.records, res.window_s)["overall"][key] or 0.0
        a = total / seeds
        out.probes.append((rate, a))
        if a >= target and rate > out.rate:
            out.rate, out.attainment = rate, a
        return a

    lo, hi = None, None  # lo meets the target, hi does not
    rate = start_rate
    while len(out.probes) < max_probes:
        if attain(rate) >= target:
            lo = rate
            if hi is not None or rate >= max_rate:
                break
            rate = min(rate * 2, max_rate)
        else:
            hi = rate
            if lo is not None or rate <= min_rate:
                break
            rate = max(rate / 2, min_rate)
    while lo is not None and hi is not None and hi - lo > rel_tol * lo and len(out.probes) < max_probes:
        mid = (lo + hi) / 2
        if attain(mid) >= target:
            lo = mid
        else:
            hi = mid
    return out
