"""Synthetic planner inputs for tests and `bench-planner`: realistic random request mixes,
delivered as protocol messages (so they go through `Planner.observe` like real ones).

Classes and SLOs follow the recommended 8B table of reference/workloads-and-calibration.md
section 2.4; prompt/output lengths are rough per-class log-normal draws.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from protos import messages as protos


@dataclass(frozen=True)
class ClassSpec:
    name: str
    ttft_s: float
    tpot_s: float
    prompt_median: int
    output_median: int
    priority: int = 0
    stages: tuple[protos.Stage, ...] = ()


CLASSES: tuple[ClassSpec, ...] = (
    ClassSpec("coding", 0.5, 0.030, 1500, 400, priority=1),
    ClassSpec("chat", 1.0, 0.100, 600, 300),
    ClassSpec("summarization", 2.0, 0.150, 6000, 200),
    ClassSpec("tool-call", 0.3, 0.030, 2500, 80, priority=2),
    ClassSpec("reasoning", 1.0, 0.030, 400, 1500,
              stages=(protos.Stage(0.030, 1200), protos.Stage(0.100, 0))),
)


def _lognormal(rng: random.Random, median: int, sigma: float = 0.8, lo: int = 1, hi: int = 32000) -> int:
    return max(lo, min(hi, int(median * math.exp(rng.gauss(0.0, sigma)))))


def random_arrival(rng: random.Random, rid: str, arrival_s: float) -> protos.RequestArrived:
    spec = rng.choice(CLASSES)
    prompt = _lognormal(rng, spec.prompt_median, lo=8)
    return protos.RequestArrived(
        rid=rid,
        prompt_tokens=prompt,
        max_new_tokens=_lognormal(rng, spec.output_median, lo=4, hi=8192),
        slo=protos.Slo(
            ttft_s=spec.ttft_s,
            tpot_s=spec.tpot_s,
            stages=list(spec.stages),
            slo_class=spec.name,
            priority=spec.priority,
        ),
        arrival_s=arrival_s,
        cached_prefix_tokens=rng.choice((0, 0, 0, prompt // 2)),
    )


def random_mix(
    rng: random.Random,
    n: int,
    now_s: float = 100.0,
    waiting_frac: float = 0.15,
    prefilling_frac: float = 0.1,
    step: int = 0,
    kv_capacity_tokens: int = 450_000,
    spec_depth: int = 4,
) -> tuple[list[protos.RequestArrived], protos.IterationReport]:
    """`n` active requests: arrivals plus one report that puts most of them in flight.

    Waiting requests get no progress; prefilling ones are part-way through their prompt;
    the rest are decoding (some with a speculation outcome this step)."""
    arrivals, progress = [], []
    for i in range(n):
        a = random_arrival(rng, f"r{step}-{i}", now_s - rng.uniform(0.0, 20.0))
        arrivals.append(a)
        u = rng.random()
        if u < waiting_frac:
            continue
        if u < waiting_frac + prefilling_frac:
            done = rng.randint(a.cached_prefix_tokens + 1, a.prompt_tokens) if a.prompt_tokens > a.cached_prefix_tokens + 1 else a.prompt_tokens - 1
            progress.append(protos.RequestProgress(a.rid, max(done, 1), 0, prefill_tokens=min(done, 2048)))
            continue
        decoded = rng.randint(1, max(1, a.max_new_tokens - 1))
        depth = rng.choice((0, spec_depth))
        accepted = rng.randint(0, depth) if depth else 0
        progress.append(
            protos.RequestProgress(
                a.rid, a.prompt_tokens, decoded, verified=depth, accepted=accepted, depth=depth,
                first_token_s=a.arrival_s + rng.uniform(0.05, 1.0),
                stage=1 if a.slo.stages and decoded > 1200 else 0,
            )
        )
    used = sum(p.prefilled + p.decoded for p in progress)
    report = protos.IterationReport(
        step=step,
        start_s=now_s - 0.02,
        end_s=now_s,
        plan_step=-1,
        prefill_tokens=0,
        verify_tokens=len(progress),
        draft_steps=spec_depth,
        context_tokens=used,
        kv_free_tokens=max(0, kv_capacity_tokens - used),
        progress=progress,
        waiting=n - len(progress),
    )
    return arrivals, report


def next_report(prev: protos.IterationReport, plan: protos.Plan, dt_s: float = 0.02) -> protos.IterationReport:
    """A plausible report for the step after `prev`, had the engine run `plan`: each decode
    entry verifies its chain (depth = entry depth, random acceptance) and commits accepted + 1
    tokens, each chunk prefills its tokens (used by the benchmark loop)."""
    rng = random.Random(prev.step)
    chunks = {c.rid: c.tokens for c in plan.prefill}
    entries = {e.rid: e for e in plan.decode}
    progress = []
    draft_steps = 0
    for p in prev.progress:
        e = entries.get(p.rid)
        if e is not None:
            acc = rng.randint(0, e.depth) if e.depth else 0
            draft_steps = max(draft_steps, e.depth)
            progress.append(protos.RequestProgress(
                p.rid, p.prefilled, p.decoded + 1 + acc, verified=e.depth, accepted=acc, depth=e.depth,
                first_token_s=p.first_token_s, stage=p.stage))
        elif p.rid in chunks:
            progress.append(protos.RequestProgress(p.rid, p.prefilled + chunks[p.rid], p.decoded, prefill_tokens=chunks[p.rid]))
        else:
            progress.append(p)
    return protos.IterationReport(
        step=prev.step + 1,
        start_s=prev.end_s,
        end_s=prev.end_s + dt_s,
        plan_step=plan.step,
        prefill_tokens=sum(chunks.values()),
        verify_tokens=sum(e.tree_cap for e in plan.decode),
        draft_steps=draft_steps,
        context_tokens=prev.context_tokens,
        kv_free_tokens=prev.kv_free_tokens,
        progress=progress,
    )
