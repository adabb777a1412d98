"""Factories for policy tests: random planner states on the H100 8B profile (+ their own checks)."""

from __future__ import annotations

import random
from pathlib import Path

from protos import messages as protos
from sidecar.acceptance import AcceptanceModel
from sidecar.cost_model import EngineLimits, load_profile
from sidecar.policies.base import PlanContext
from sidecar.state import PlannerState

ROOT = Path(__file__).resolve().parents[1]
H100 = load_profile(ROOT / "configs/hardware/h100-llama3.1-8b-eagle3.yaml")
Decision = protos.Decision

CLASSES = {
    "coding": protos.Slo(0.5, 0.030, slo_class="coding"),
    "chat": protos.Slo(1.0, 0.100, slo_class="chat"),
    "tool-call": protos.Slo(0.3, 0.030, slo_class="tool-call"),
    "reasoning": protos.Slo(
        1.0, 0.030, stages=[protos.Stage(0.030, tokens=300), protos.Stage(0.100)], slo_class="reasoning"
    ),
}


def make_limits(max_depth: int = 8, max_width: int = 4, kv: int = 450_000, tiers: tuple[int, ...] = ()) -> EngineLimits:
    return EngineLimits(kv_capacity_tokens=kv, max_batch_tokens=8192, max_depth=max_depth, max_width=max_width, depth_tiers=tiers)


def make_state(
    rng: random.Random,
    n_decoding: int,
    n_prefilling: int = 0,
    n_waiting: int = 0,
    now: float = 100.0,
    limits: EngineLimits | None = None,
    best_effort_share: float = 0.0,
) -> PlannerState:
    """A state with requests in each phase, random SLO classes, lengths and progress."""
    st = PlannerState(limits=limits or make_limits())
    st.spec_modes = (protos.SpecMode.TREE,)
    st.now_s = now
    names = list(CLASSES)
    for i in range(n_decoding + n_prefilling + n_waiting):
        prompt = rng.randint(16, 4000)
        slo = CLASSES[rng.choice(names)]
        arrival = now - rng.uniform(0.0, 20.0)
        r = st.add(protos.RequestArrived(f"r{i}", prompt, rng.randint(4, 2000), slo, arrival))
        if i < n_decoding:
            r.prefilled = prompt
            r.decoded = rng.randint(1, max(1, r.max_new_tokens - 1))
            r.first_token_s = arrival + rng.uniform(0.05, 2.0)
            if slo.stages and r.decoded > 300:
                r.stage = 1
                r.stage_starts = [0, 300]
            r.decision = Decision.BEST_EFFORT if rng.random() < best_effort_share else Decision.ADMIT
        elif i < n_decoding + n_prefilling:
            r.prefilled = rng.randint(0, prompt - 1)
            r.arrival_s = now - rng.uniform(0.0, 1.0)
            r.decision = Decision.ADMIT
        else:
            r.arrival_s = now - rng.uniform(0.0, 0.4)
    used = sum(r.kv_tokens for r in st.requests.values())
    st.kv_free_tokens = max(0, st.limits.kv_capacity_tokens - used)
    return st


def make_ctx(st: PlannerState, acceptance: AcceptanceModel | None = None) -> PlanContext:
    return PlanContext(st, H100.cost, acceptance or AcceptanceModel(H100.acceptance_priors), st.now_s, step=st.step + 1)


def check_plan_invariants(st: PlannerState, plan: protos.Plan) -> None:
    """The base.py contract: budget, decode entries for running requests, chunk limits."""
    prefill = sum(c.tokens for c in plan.prefill)
    assert prefill + len(plan.decode) <= plan.token_budget, (prefill, len(plan.decode), plan.token_budget)
    assert plan.token_budget <= max(st.limits.max_batch_tokens, len(plan.decode)), "over the engine batch limit"
    caps = sum(e.tree_cap for e in plan.decode)
    assert caps + prefill <= plan.token_budget, "engines reserve tree caps before prefill: chunks would not run"
    decisions = {d.rid: d.decision for d in plan.decisions}
    entries = {e.rid: e for e in plan.decode}
    assert len(entries) == len(plan.decode), "duplicate decode entries"
    for r in st.requests.values():
        running = r.is_admitted and r.prefilled >= r.prompt_tokens
        if running and decisions.get(r.rid) != Decision.PREEMPT:
            assert r.rid in entries, f"running {r.rid} has no decode entry"
            e = entries[r.rid]
            assert e.tree_cap >= 1 and e.min_tokens >= 1.0 and e.depth >= 0 and e.width >= 1
            assert e.depth <= st.limits.max_depth and e.width <= st.limits.max_width
        if r.is_admitted and r.decision == Decision.ADMIT:
            assert decisions.get(r.rid, Decision.ADMIT) == Decision.ADMIT, f"admitted {r.rid} lost its admission"
    for c in plan.prefill:
        r = st.requests[c.rid]
        assert 0 < c.tokens <= r.remaining_prefill
        assert r.is_admitted or decisions.get(c.rid) in (Decision.ADMIT, Decision.BEST_EFFORT)
    assert len({c.rid for c in plan.prefill}) == len(plan.prefill), "duplicate chunks"
    assert len(decisions) == len(plan.decisions), "duplicate decisions"


def test_factory_state_phases():
    st = make_state(random.Random(0), 5, 3, 4)
    assert len(st.decoding()) == 5
    assert len(st.waiting()) == 4
    assert all(r.remaining_prefill > 0 for r in st.running() if r not in st.decoding())
