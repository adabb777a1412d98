"""Every policy keeps the base.py plan contract on many random planner states."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st_

from protos import messages as protos
from sidecar.policies.base import make_policy
from test_policies_factories import check_plan_invariants, make_ctx, make_limits, make_state

POLICIES = ["adaserve", "specserve", "slos_serve", "slo_unified"]

states = st_.tuples(
    st_.integers(0, 2**31),  # seed
    st_.integers(0, 80),  # decoding
    st_.integers(0, 8),  # prefilling
    st_.integers(0, 20),  # waiting
    st_.sampled_from([(8, 4, ()), (0, 1, ()), (6, 1, (2, 4, 6)), (3, 2, ())]),  # limits
    st_.sampled_from([0.0, 0.3]),  # best-effort share
    st_.sampled_from([450_000, 40_000]),  # KV capacity
)


@pytest.mark.parametrize("name", POLICIES)
@settings(max_examples=60, deadline=None)
@given(spec=states)
def test_plan_contract(name, spec):
    seed, n_dec, n_pre, n_wait, (depth, width, tiers), be, kv = spec
    rng = random.Random(seed)
    lim = make_limits(max_depth=depth, max_width=width, kv=kv, tiers=tiers)
    st = make_state(rng, n_dec, n_pre, n_wait, limits=lim, best_effort_share=be)
    policy = make_policy(name)
    plan = policy.plan(make_ctx(st))
    check_plan_invariants(st, plan)
    if tiers:
        for e in plan.decode:
            assert e.depth == 0 or e.depth in tiers


@pytest.mark.parametrize("name", POLICIES)
def test_repeated_plans_keep_admissions(name):
    """Applying each plan's decisions and planning again never un-admits anyone."""
    rng = random.Random(7)
    st = make_state(rng, 30, 4, 30)
    policy = make_policy(name)
    for _ in range(5):
        plan = policy.plan(make_ctx(st))
        check_plan_invariants(st, plan)
        for d in plan.decisions:
            st.requests[d.rid].decision = d.decision
        for c in plan.prefill:  # the engine ran the chunks
            st.requests[c.rid].prefilled += c.tokens
        st.now_s += 0.02


@pytest.mark.parametrize("name", POLICIES)
def test_thousands_of_requests_stay_within_the_engine_batch_limit(name):
    rng = random.Random(21)
    st = make_state(rng, 3000, 20, 50, limits=make_limits(kv=20_000_000))
    plan = make_policy(name).plan(make_ctx(st))
    check_plan_invariants(st, plan)


@pytest.mark.parametrize("name", POLICIES)
def test_unknown_option_is_a_clear_error(name):
    with pytest.raises(ValueError, match="unknown option"):
        make_policy(name, no_such_option=1)


def test_no_speculation_engine_gets_depth_zero():
    st = make_state(random.Random(3), 20, 2, 5, limits=make_limits(max_depth=0, max_width=1))
    st.spec_modes = (protos.SpecMode.NONE,)
    for name in POLICIES:
        plan = make_policy(name).plan(make_ctx(st))
        assert all(e.depth == 0 and e.tree_cap == 1 for e in plan.decode), name
