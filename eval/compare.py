"""Run one workload under several policies on one hardware profile; JSON-ready summaries."""

from __future__ import annotations

from pathlib import Path

from eval.metrics import summarize
from eval.simulator import SimConfig, SimResult, simulate
from eval.slo_classes import DEFAULT_PATH as DEFAULT_SLO_PATH
from eval.slo_classes import load_slo_classes, scale_for_unloaded_tpot
from eval.workloads import Workload, generate, load_workload_spec
from sidecar.cost_model import HardwareProfile, load_profile

REF_CONTEXT_TOKENS = 1024  # context at which the unloaded TPOT is quoted


def unloaded_tpot_s(profile: HardwareProfile, context_tokens: int = REF_CONTEXT_TOKENS) -> float:
    """Per-token latency of one request alone, no speculation (AdaServe's 'baseline'), seconds."""
    return profile.cost.iteration_time(0, 1, 0, context_tokens, 0)


def default_max_context(profile: HardwareProfile) -> int:
    """Longest request (prompt + output) to generate: 32k tokens, or 1/8 of the KV cache."""
    return max(8, min(32768, profile.engine.kv_capacity_tokens // 8))


def make_workload(workload: str, hardware: str | Path, *, rate: float | None = None,
                  duration_s: float | None = None, seed: int = 0, max_context: int | None = None,
                  scale_slos: bool = False) -> Workload:
    """Generate a workload (name or path) sized for the hardware profile.

    scale_slos: rescale the SLO class file by the profile's unloaded TPOT (slow engines such as
    the CPU tiny model; `eval.slo_classes.scale_for_unloaded_tpot`)."""
    profile = load_profile(hardware)
    spec = load_workload_spec(workload)
    base = unloaded_tpot_s(profile)
    classes = load_slo_classes(spec.slo_classes or DEFAULT_SLO_PATH)
    if scale_slos:
        classes = scale_for_unloaded_tpot(classes, base)
    return generate(spec, rate=rate, duration_s=duration_s, seed=seed,
                    max_context_tokens=max_context or default_max_context(profile),
                    unloaded_tpot_s=base, slo_classes=classes)


def result_summary(res: SimResult) -> dict:
    """Metrics of one run; goodput is per second of the arrival window (the same for every policy)."""
    s = summarize(res.records, res.window_s or res.elapsed_s)
    return {"policy": res.policy, "elapsed_s": res.elapsed_s, "window_s": res.window_s, **s, "stats": res.stats}


def compare(workload: Workload, hardware: str | Path, policies: list[str], *, seed: int = 0,
            over_zmq: bool = False, config: SimConfig = SimConfig(),
            policy_overrides: dict | None = None) -> dict[str, dict]:
    """policy -> summary (see `eval.metrics.summarize`) plus simulator stats."""
    return {p: result_summary(simulate(workload, hardware, p, seed=seed, over_zmq=over_zmq, config=config,
                                       policy_overrides=policy_overrides))
            for p in policies}
