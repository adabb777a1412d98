"""slo_unified's incremental state gives the same numbers as recomputing from scratch."""

from __future__ import annotations

import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st_

from protos import messages as protos
from sidecar.acceptance import AcceptanceModel
from sidecar.policies.base import make_policy
from sidecar.policies.expected_rows import ExpectedRows, expected_table
from sidecar.state import ReqState
from test_policies_factories import H100, check_plan_invariants, make_ctx, make_state


@settings(max_examples=150, deadline=None)
@given(
    tokens=st_.lists(st_.integers(0, 40), min_size=1, max_size=3),
    tpots=st_.lists(st_.sampled_from([0.02, 0.03, 0.1]), min_size=3, max_size=3),
    allowance=st_.sampled_from([0.0, 0.5]),
    steps=st_.lists(st_.integers(1, 9), min_size=1, max_size=25),
    ttft_late=st_.booleans(),
)
def test_staged_deadline_cache_matches_token_deadline(tokens, tpots, allowance, steps, ttft_late):
    """Advance a multi-stage request by random token counts (switching stages like the engine
    reports) and compare the policy's cached next-token deadline with ReqState's."""
    stages = [protos.Stage(tpots[k], tokens=t, ttft_s=allowance if k else 0.0) for k, t in enumerate(tokens)]
    stages.append(protos.Stage(tpots[-1]))
    slo = protos.Slo(1.0, tpots[0], stages=stages, slo_class="reasoning")
    r = ReqState.from_arrived(protos.RequestArrived("x", 100, 10_000, slo, 5.0))
    r.prefilled = 100
    r.first_token_s = 6.5 if ttft_late else 5.2
    r.decoded = 1
    policy = make_policy("slo_unified")
    bounds = np.cumsum([max(1, t) for t in tokens])  # where the engine switches stages
    for n in steps:
        r.decoded += n
        new_stage = int(np.searchsorted(bounds, r.decoded, side="right"))
        while r.stage < min(new_stage, len(stages) - 1):
            r.stage_starts.append(int(bounds[r.stage]))
            r.stage += 1
        got, tp = policy._staged_deadline(r)
        assert abs(got - r.token_deadline(r.decoded + 1)) < 1e-9
        assert tp == r.tpot_now


def test_expected_rows_match_direct_table_across_refreshes():
    acc = AcceptanceModel(H100.acceptance_priors)
    rows = ExpectedRows(refresh=3)
    rng = random.Random(1)
    live = [f"r{i}" for i in range(50)]
    for i, rid in enumerate(live):
        acc.register(rid, rng.choice(["coding", "chat", "reasoning"]))
    for plan_no in range(1, 30):
        # requests come and go; acceptance estimates move
        if plan_no % 5 == 0:
            live = live[7:] + [f"n{plan_no}_{k}" for k in range(7)]
            for rid in live[-7:]:
                acc.register(rid, "chat")
        for rid in rng.sample(live, 10):
            acc.observe(rid, "chat", protos.RequestProgress(rid, 0, 0, verified=6, accepted=rng.randint(0, 6), depth=6))
        got = rows.gather(acc, live, 6, plan_no)
        direct = expected_table(np.array([acc.alphas(rid, 6) for rid in live]))
        # a row is at most `refresh` plans old: equal right after its refresh, close otherwise
        assert got.shape == direct.shape
        assert np.all(got[:, 0] == 1.0) and np.all(np.diff(got, axis=1) >= 0)
        if plan_no % 3 == 0:
            fresh = ExpectedRows(refresh=1).gather(acc, live, 6, plan_no)
            assert np.allclose(fresh, direct)


def test_expected_rows_refresh_every_plan_is_exact():
    acc = AcceptanceModel(H100.acceptance_priors)
    rows = ExpectedRows(refresh=1)
    live = [f"r{i}" for i in range(20)]
    for plan_no in range(1, 6):
        for rid in live[:5]:
            acc.observe(rid, "coding", protos.RequestProgress(rid, 0, 0, verified=4, accepted=plan_no % 4, depth=4))
        got = rows.gather(acc, live, 8, plan_no)
        assert np.allclose(got, expected_table(np.array([acc.alphas(rid, 8) for rid in live])))


def test_unified_keeps_contract_over_a_simulated_run():
    """Plan, apply, let the 'engine' commit tokens, repeat: contract holds throughout."""
    rng = random.Random(12)
    st = make_state(rng, 40, 6, 25, best_effort_share=0.1)
    policy = make_policy("slo_unified")
    for _ in range(30):
        plan = policy.plan(make_ctx(st))
        check_plan_invariants(st, plan)
        for d in plan.decisions:
            r = st.requests[d.rid]
            r.decision = d.decision
            if d.decision == protos.Decision.PREEMPT:
                r.prefilled = 0
        for c in plan.prefill:
            st.requests[c.rid].prefilled += c.tokens
        for e in plan.decode:
            r = st.requests[e.rid]
            r.decoded = min(r.max_new_tokens, r.decoded + rng.randint(1, e.tree_cap))
            if r.first_token_s == 0.0:
                r.first_token_s = st.now_s
        for rid in [r.rid for r in st.requests.values() if r.decoded >= r.max_new_tokens]:
            del st.requests[rid]
        st.now_s += 0.03
