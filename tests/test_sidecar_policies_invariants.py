"""fcfs / fcfs_mixed / priority: plan invariants on many random planner states (hypothesis),
plus the behaviours that define them (SGLang's prefill-first non-mixed iteration, FCFS
head-of-line order, chunk size, fixed k, priority preemption)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from protos import messages as m
from sidecar.cost_model import profile_from_dict
from sidecar.planner import Planner
from sidecar.policies.base import make_policy
from sidecar.state import ReqState

D = m.Decision


def _profile(max_batch_tokens=256, kv=20_000, max_depth=6, tiers=()):
    return profile_from_dict({
        "name": "test", "source": "test",
        "engine": {"kv_capacity_tokens": kv, "max_batch_tokens": max_batch_tokens, "max_depth": max_depth,
                   "max_width": 2, "depth_tiers": list(tiers)},
        "cost": {"base_s": 0.01, "k_tok_s": 1e-5, "k_ctx_s": 1e-8},
    })


def _planner(policy, spec=True, **kw):
    planner = Planner.create(policy, _profile(**{k: kw.pop(k) for k in list(kw) if k in ("max_batch_tokens", "kv", "max_depth", "tiers")}), **kw)
    if spec:
        planner.state.spec_modes = (m.SpecMode.CHAIN,)
    return planner


req_strategy = st.fixed_dictionaries({
    "prompt": st.integers(1, 3000),
    "max_new": st.integers(1, 2000),
    "phase": st.sampled_from(["waiting", "prefilling", "decoding", "preempted", "rejected", "best_effort"]),
    "frac": st.floats(0.0, 1.0),
    "decoded_frac": st.floats(0.0, 1.0),
    "priority": st.integers(0, 3),
    "cached_frac": st.sampled_from([0.0, 0.0, 0.5, 1.0]),
})


def _build(planner: Planner, reqs: list[dict], kv_free: int) -> None:
    st_ = planner.state
    for i, spec in enumerate(reqs):
        r = st_.add(m.RequestArrived(f"r{i}", spec["prompt"], spec["max_new"],
                                     m.Slo(1.0, 0.05, priority=spec["priority"]), float(i),
                                     cached_prefix_tokens=int(spec["prompt"] * spec["cached_frac"])))
        phase = spec["phase"]
        if phase == "prefilling":
            r.decision = D.ADMIT
            r.prefilled = min(r.prompt_tokens - 1, r.prefilled + int((r.prompt_tokens - r.prefilled) * spec["frac"]))
        elif phase in ("decoding", "best_effort"):
            r.decision = D.ADMIT if phase == "decoding" else D.BEST_EFFORT
            r.prefilled = r.prompt_tokens
            r.decoded = int(spec["decoded_frac"] * (r.max_new_tokens - 1)) + 1
        elif phase == "preempted":
            r.decision = D.PREEMPT
            r.decoded = int(spec["decoded_frac"] * r.max_new_tokens)
        elif phase == "rejected":
            r.decision = D.REJECT
    st_.kv_free_tokens = kv_free


def check_invariants(planner: Planner, before: dict[str, tuple], plan: m.Plan, max_batch_tokens: int) -> None:
    """The contract of sidecar/policies/base.py, checked against the pre-plan snapshot."""
    assert planner.contract_fixes == 0, "the policy relied on the planner's repair"
    decisions = {d.rid: d.decision for d in plan.decisions}
    assert len(decisions) == len(plan.decisions), "one decision per request"
    n_decode = len(plan.decode)
    assert sum(c.tokens for c in plan.prefill) + n_decode <= plan.token_budget
    assert plan.token_budget <= max(max_batch_tokens, n_decode)
    decode_rids = [e.rid for e in plan.decode]
    assert len(set(decode_rids)) == n_decode, "no duplicate decode entries"
    chunk_rids = [c.rid for c in plan.prefill]
    assert len(set(chunk_rids)) == len(chunk_rids), "one chunk per request"
    lim = planner.state.limits
    for e in plan.decode:
        admitted, prefilled_full, _, _ = before[e.rid]
        assert admitted and prefilled_full, f"decode entry for {e.rid} which is not running"
        assert e.tree_cap >= 1 and e.min_tokens >= 1.0 and 0 <= e.depth <= lim.max_depth
        assert e.width <= lim.max_width
        if lim.depth_tiers and e.depth:
            assert e.depth in lim.depth_tiers
    prefill_only = bool(plan.prefill) and not plan.decode  # running requests wait (SGLang default)
    for rid, (admitted, prefilled_full, remaining, _) in before.items():
        if admitted and prefilled_full and decisions.get(rid) != D.PREEMPT and not prefill_only:
            assert rid in decode_rids, f"running {rid} has no decode entry"
        if admitted:
            assert decisions.get(rid) not in (D.DEFER, D.REJECT), f"admitted {rid} was {decisions.get(rid)}"
    for c in plan.prefill:
        admitted, _, remaining, _ = before[c.rid]
        assert 0 < c.tokens <= remaining
        assert admitted or decisions.get(c.rid) in (D.ADMIT, D.BEST_EFFORT)
        assert decisions.get(c.rid) != D.PREEMPT


def _snapshot(planner: Planner) -> dict[str, tuple]:
    return {r.rid: (r.is_admitted, r.is_prefilled, r.remaining_prefill, r.slo.priority) for r in planner.state.requests.values()}


@pytest.mark.parametrize("policy", ["fcfs", "fcfs_mixed", "priority"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    reqs=st.lists(req_strategy, max_size=60),
    kv_free=st.integers(0, 20_000),
    max_batch_tokens=st.sampled_from([8, 64, 256, 2048]),
    spec_k=st.integers(0, 8),
    chunk=st.sampled_from([16, 128, 512]),
    tiers=st.sampled_from([(), (2, 4)]),
)
def test_plan_invariants_on_random_states(policy, reqs, kv_free, max_batch_tokens, spec_k, chunk, tiers):
    planner = _planner(policy, max_batch_tokens=max_batch_tokens, tiers=tiers, spec_k=spec_k, chunk_size=chunk)
    _build(planner, reqs, kv_free)
    before = _snapshot(planner)
    plan = planner.plan(100.0)
    check_invariants(planner, before, plan, max_batch_tokens)
    assert sum(c.tokens for c in plan.prefill) <= chunk
    if policy == "fcfs_mixed":  # decode rows of a mixed batch do not speculate
        assert not plan.prefill or all(e.depth == 0 and e.tree_cap == 1 for e in plan.decode)
    else:  # SGLang default: a prefill iteration carries no decodes
        assert not plan.prefill or not plan.decode
    # Only the last chunk may stop short of its prompt's end (SGLang's single chunked request).
    assert all(c.tokens == before[c.rid][2] for c in plan.prefill[:-1])
    # Admissions fit the KV the policy believes is available (plus what preemption freed).
    admitted_now = [r for r in planner.state.requests.values() if before[r.rid][0] is False and r.is_admitted]
    if policy != "priority":
        assert not any(d.decision == D.PREEMPT for d in plan.decisions)
        # FCFS: admitted ones are a prefix of the waiting queue (arrival order).
        waiting = [rid for rid, (adm, *_r) in before.items() if not adm and planner.state.requests[rid].decision != D.REJECT or rid in {r.rid for r in admitted_now}]
        got = [r.rid for r in admitted_now]
        assert got == waiting[: len(got)]
    else:
        for d in plan.decisions:
            if d.decision == D.PREEMPT:
                victim_prio = before[d.rid][3]
                assert any(before[r.rid][3] > victim_prio for r in admitted_now), "preempted without a more important admission"
    # A second plan right after keeps every invariant (decisions were applied to the state).
    before2 = _snapshot(planner)
    check_invariants(planner, before2, planner.plan(100.01), max_batch_tokens)


def test_fcfs_fixed_k_chunks_and_head_of_line():
    planner = _planner("fcfs", max_batch_tokens=512, kv=10_000, spec_k=3, chunk_size=300)
    _build(planner, [
        {"prompt": 50, "max_new": 10, "phase": "decoding", "frac": 0, "decoded_frac": 0.5, "priority": 0, "cached_frac": 0},
        {"prompt": 400, "max_new": 10, "phase": "waiting", "frac": 0, "decoded_frac": 0, "priority": 0, "cached_frac": 0},
        {"prompt": 9000, "max_new": 2000, "phase": "waiting", "frac": 0, "decoded_frac": 0, "priority": 0, "cached_frac": 0},
        {"prompt": 10, "max_new": 10, "phase": "waiting", "frac": 0, "decoded_frac": 0, "priority": 0, "cached_frac": 0},
    ], kv_free=9_000)
    plan = planner.plan(1.0)
    assert plan.decode == []  # prefill first: r0 waits while r1's chunk runs (SGLang default)
    assert [(c.rid, c.tokens) for c in plan.prefill] == [("r1", 300)]  # one chunk of chunk_size
    # r2 does not fit in KV: it blocks r3 behind it (SGLang FCFS head-of-line)
    assert [(d.rid, d.decision) for d in plan.decisions] == [("r1", D.ADMIT)]
    # The engine reports step 0 while it runs plan 1 (pipelined): the next plan counts plan 1's
    # chunk as done and continues r1's prefill, still blocked on r2.
    assert plan.step == 1
    planner.observe(m.IterationReport(0, 0.9, 1.0, -1, 0, 1, 0, 60, 9_000, [m.RequestProgress("r0", 50, 6)]))
    plan2 = planner.plan(1.1)
    assert plan2.step == 2
    assert [(c.rid, c.tokens) for c in plan2.prefill] == [("r1", 100)]
    assert plan.token_budget == 512 and plan.spec_depth == -1
    # Nothing left to prefill (r2 still blocks the queue): a decode iteration with fixed k.
    planner.observe(m.IterationReport(1, 1.0, 1.1, 1, 300, 0, 0, 60, 9_000, [m.RequestProgress("r1", 300, 0)]))
    planner.observe(m.IterationReport(2, 1.1, 1.2, 2, 100, 0, 0, 60, 9_000, [m.RequestProgress("r1", 400, 1)]))
    plan3 = planner.plan(1.2)
    assert plan3.prefill == []
    assert [(e.rid, e.depth, e.tree_cap, e.width, e.min_tokens) for e in plan3.decode] == [
        ("r0", 3, 4, 1, 1.0), ("r1", 3, 4, 1, 1.0)]


def test_fcfs_mixed_chunk_shares_the_iteration_without_speculation():
    planner = _planner("fcfs_mixed", max_batch_tokens=512, kv=10_000, spec_k=3, chunk_size=300)
    _build(planner, [
        {"prompt": 50, "max_new": 10, "phase": "decoding", "frac": 0, "decoded_frac": 0.5, "priority": 0, "cached_frac": 0},
        {"prompt": 400, "max_new": 10, "phase": "waiting", "frac": 0, "decoded_frac": 0, "priority": 0, "cached_frac": 0},
    ], kv_free=9_000)
    plan = planner.plan(1.0)
    assert [(e.rid, e.depth, e.tree_cap) for e in plan.decode] == [("r0", 0, 1)]
    assert [(c.rid, c.tokens) for c in plan.prefill] == [("r1", 299)]  # chunk less r0's token
    assert make_policy("fcfs_mixed").config.mixed_chunk and not make_policy("fcfs").config.mixed_chunk


def test_fcfs_rejects_prompts_larger_than_kv_and_spec_off_without_engine_support():
    planner = _planner("fcfs", spec=False, kv=1000, spec_k=4)
    _build(planner, [
        {"prompt": 5000, "max_new": 10, "phase": "waiting", "frac": 0, "decoded_frac": 0, "priority": 0, "cached_frac": 0},
        {"prompt": 10, "max_new": 10, "phase": "decoding", "frac": 0, "decoded_frac": 0.5, "priority": 0, "cached_frac": 0},
    ], kv_free=900)
    plan = planner.plan(1.0)
    assert [(d.rid, d.decision) for d in plan.decisions] == [("r0", D.REJECT)]
    assert [(e.depth, e.tree_cap) for e in plan.decode] == [(0, 1)]
    assert [d.decision for d in planner.plan(1.1).decisions] == []  # rejected once, not every plan


def test_depth_tiers_clip_k():
    planner = _planner("fcfs", tiers=(2, 4), spec_k=3)
    _build(planner, [{"prompt": 10, "max_new": 10, "phase": "decoding", "frac": 0, "decoded_frac": 0.5, "priority": 0, "cached_frac": 0}], 10_000)
    plan = planner.plan(1.0)
    assert plan.decode[0].depth == 2 and plan.spec_depth == 2


def test_priority_orders_and_preempts_lowest_priority_latest_first():
    # mixed_chunk: the decode entries come with the prefill, so their order shows too.
    planner = _planner("priority", max_batch_tokens=256, kv=3000, spec_k=0, chunk_size=256, new_token_ratio=0.0,
                       mixed_chunk=True)
    _build(planner, [
        {"prompt": 1000, "max_new": 10, "phase": "decoding", "frac": 0, "decoded_frac": 0.0, "priority": 0, "cached_frac": 0},
        {"prompt": 1000, "max_new": 10, "phase": "decoding", "frac": 0, "decoded_frac": 0.0, "priority": 0, "cached_frac": 0},
        {"prompt": 500, "max_new": 10, "phase": "decoding", "frac": 0, "decoded_frac": 0.0, "priority": 2, "cached_frac": 0},
        {"prompt": 800, "max_new": 10, "phase": "waiting", "frac": 0, "decoded_frac": 0, "priority": 0, "cached_frac": 0},
        {"prompt": 800, "max_new": 10, "phase": "waiting", "frac": 0, "decoded_frac": 0, "priority": 3, "cached_frac": 0},
    ], kv_free=300)
    plan = planner.plan(1.0)
    # r4 (prio 3) is first; 300 free < 800: preempt r1 (prio 0, latest) which frees 1001.
    assert [(d.rid, d.decision) for d in plan.decisions] == [("r1", D.PREEMPT), ("r4", D.ADMIT)]
    assert [e.rid for e in plan.decode] == ["r2", "r0"]  # priority order, r1 gone
    assert plan.prefill[0].rid == "r4"
    assert planner.state.requests["r1"].is_waiting and planner.state.requests["r1"].prefilled == 0


def test_make_policy_errors_are_clear():
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        make_policy("nope")
    with pytest.raises(ValueError, match="unknown option"):
        make_policy("fcfs", chunk=3)
    with pytest.raises(ValueError, match="bad fcfs"):
        make_policy("fcfs", chunk_size=0)


def test_priority_preempt_threshold_and_switch():
    reqs = [
        {"prompt": 1000, "max_new": 10, "phase": "decoding", "frac": 0, "decoded_frac": 0.0, "priority": 1, "cached_frac": 0},
        {"prompt": 800, "max_new": 10, "phase": "waiting", "frac": 0, "decoded_frac": 0, "priority": 3, "cached_frac": 0},
    ]
    for opts, preempted in [({}, True), ({"preempt_threshold": 2}, False), ({"preempt_threshold": 1}, True),
                            ({"preemption": False}, False)]:
        planner = _planner("priority", max_batch_tokens=256, kv=3000, spec_k=0, new_token_ratio=0.0, **opts)
        _build(planner, reqs, kv_free=300)
        plan = planner.plan(1.0)
        assert (("r0", D.PREEMPT) in [(d.rid, d.decision) for d in plan.decisions]) is preempted, opts
