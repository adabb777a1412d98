"""Planner under random message sequences (engine behaviour it cannot trust): arrivals,
reports with progress for known and unknown rids, finishes, resyncs, hellos. It must never
raise, and every plan keeps the policy contract."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from protos import messages as m
from sidecar.planner import Planner
from sidecar.synthetic import random_arrival
from tests.test_sidecar_policies_invariants import _profile, _snapshot, check_invariants

D = m.Decision


class FakeEngine:
    """Applies plans roughly as an engine would, with noise (drops, fallback steps, aborts)."""

    def __init__(self, rng: random.Random, planner: Planner):
        self.rng, self.planner = rng, planner
        self.reqs: dict[str, list] = {}  # rid -> [prompt, max_new, prefilled, decoded, arrived msg, admitted]
        self.step, self.t, self.n = 0, 0.0, 0

    def arrive(self) -> m.RequestArrived:
        a = random_arrival(self.rng, f"q{self.n}", self.t)
        a = m.RequestArrived(a.rid, min(a.prompt_tokens, 3000), min(a.max_new_tokens, 300), a.slo, a.arrival_s,
                             cached_prefix_tokens=min(a.cached_prefix_tokens, 1000))
        self.n += 1
        self.reqs[a.rid] = [a.prompt_tokens, a.max_new_tokens, a.cached_prefix_tokens, 0, a, False]
        return a

    def run(self, plan: m.Plan | None) -> list[m.Message]:
        self.step += 1
        self.t += 0.02
        out: list[m.Message] = []
        progress = []
        if plan is not None and self.rng.random() < 0.9:
            for d in plan.decisions:
                r = self.reqs.get(d.rid)
                if r is None:
                    continue
                if d.decision in (D.ADMIT, D.BEST_EFFORT):
                    r[5] = True
                elif d.decision == D.REJECT:
                    del self.reqs[d.rid]
                    out.append(m.RequestFinished(d.rid, m.FinishReason.REJECTED, 0, self.t))
                elif d.decision == D.PREEMPT:
                    r[2], r[5] = 0, False
            for c in plan.prefill:
                r = self.reqs.get(c.rid)
                if r is not None and r[5]:
                    r[2] = min(r[0], r[2] + c.tokens)
                    progress.append(m.RequestProgress(c.rid, r[2], r[3], prefill_tokens=c.tokens))
            for e in plan.decode:
                r = self.reqs.get(e.rid)
                if r is not None and r[5] and r[2] >= r[0]:
                    acc = self.rng.randint(0, e.depth) if e.depth else 0
                    r[3] = min(r[1], r[3] + 1 + acc)
                    progress.append(m.RequestProgress(e.rid, r[2], r[3], verified=e.depth, accepted=acc, depth=e.depth,
                                                      first_token_s=self.t))
                    if r[3] >= r[1]:
                        del self.reqs[e.rid]
                        out.append(m.RequestFinished(e.rid, m.FinishReason.LENGTH, r[3], self.t))
        if self.rng.random() < 0.05:
            progress.append(m.RequestProgress(f"ghost{self.step}", 5, 1))
        used = sum(r[2] + r[3] for r in self.reqs.values())
        report = m.IterationReport(self.step, self.t - 0.02, self.t, plan.step if plan else -1,
                                   sum(p.prefill_tokens for p in progress), len(progress), 0, used,
                                   max(0, 20_000 - used), progress)
        return [report] + out

    def resync(self) -> m.Resync:
        snaps = [m.RequestSnapshot(r[4], r[2], r[3], self.t if r[3] else 0.0, 0, D.ADMIT if r[5] else D.DEFER)
                 for r in self.reqs.values()]
        return m.Resync(self.t, self.step, snaps, max(0, 20_000 - sum(r[2] + r[3] for r in self.reqs.values())))


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**9), ops=st.lists(st.sampled_from("aaarrrrrrfsh"), min_size=5, max_size=80))
def test_random_message_sequences_never_break_the_planner(policy, seed, ops):
    planner = Planner.create(policy, _profile(max_batch_tokens=512, kv=20_000), chunk_size=256)
    planner.observe(m.EngineHello(m.PROTOCOL_VERSION, "fuzz", [m.SpecMode.CHAIN], 512, 20_000, 4, 1))
    engine = FakeEngine(random.Random(seed), planner)
    plan = None
    for op in ops:
        if op == "a":
            planner.observe(engine.arrive())
        elif op == "r":
            for msg in engine.run(plan):
                planner.observe(msg)
            before = _snapshot(planner)
            plan = planner.plan(engine.t)
            check_invariants(planner, before, plan, 512)
        elif op == "f" and engine.reqs:
            rid = engine.rng.choice(list(engine.reqs))
            del engine.reqs[rid]
            planner.observe(m.RequestFinished(rid, m.FinishReason.ABORT, 0, engine.t))
        elif op == "s":
            planner.observe(engine.resync())
            assert set(planner.state.requests) == set(engine.reqs)
        elif op == "h":
            planner.observe(m.EngineHello(m.PROTOCOL_VERSION, "fuzz", [m.SpecMode.CHAIN], 512, 20_000, 4, 1))
    # The planner's view of in-flight requests never includes finished ones.
    assert all(rid in engine.reqs for rid in planner.state.requests)
    assert planner.contract_fixes == 0
