"""Decode-capacity admission (sidecar/policies/decode_gate.py) and its use in slo_unified."""

from __future__ import annotations

import pytest

from protos import messages as protos
from sidecar.acceptance import AcceptanceModel
from sidecar.policies.base import PlanContext, make_policy
from sidecar.policies.decode_gate import ArrivalRate, GateCandidate, GateLoad, admit_decodes, pace_limit
from test_policies_factories import H100, check_plan_invariants
from test_policies_unified import _decoders

PROFILE = H100  # the H100 8B EAGLE-3 profile
COST = PROFILE.cost


def test_gate_admits_while_the_projected_iteration_keeps_pace():
    load = GateLoad(nodes=400, seqs=100, context=100 * 2000, steps=3)
    cands = [GateCandidate(4, 2000, 1.0) for _ in range(400)]
    t_allow = 0.06
    ok = admit_decodes(COST, load, t_allow, 0.0, cands)
    k = sum(ok)
    assert 0 < k < len(cands) and ok == [True] * k + [False] * (len(cands) - k)  # equal candidates: a prefix
    t = lambda m: COST.iteration_time(0, 400 + 4 * m, 3, 2000 * (100 + m), 400 + 4 * m - 100 - m)  # noqa: E731
    assert t(k) <= t_allow < t(k + 1)
    # A prefill duty stretches every iteration: fewer decoders fit.
    assert sum(admit_decodes(COST, load, t_allow, 0.3, cands)) < k
    assert pace_limit(0.04, 0.5) == pytest.approx(0.08)


def test_gate_skips_a_big_candidate_but_takes_a_smaller_later_one_and_honours_its_pace():
    load = GateLoad(nodes=400, seqs=100, context=100 * 2000, steps=3)
    t0 = COST.iteration_time(0, 404, 3, 202_000, 303)
    big, small = GateCandidate(4, 2_000_000, 1.0), GateCandidate(4, 2000, 1.0)
    assert admit_decodes(COST, load, t0 * 1.01, 0.0, [big, small]) == [False, True]
    # A candidate's own pace tighter than the iteration it would join: declined.
    assert admit_decodes(COST, load, 1.0, 0.0, [GateCandidate(4, 2000, t0 * 0.9)]) == [False]


def test_a_candidate_whose_own_pace_no_batch_keeps_is_held_to_the_batch_pace_only():
    load = GateLoad(nodes=400, seqs=100, context=100 * 2000, steps=3)
    t_with = COST.iteration_time(0, 404, 3, 202_000, 303)  # the batch with the candidate
    t_alone = COST.iteration_time(0, 4, 3, 2000, 3)  # the candidate alone
    hopeless = GateCandidate(4, 2000, t_alone * 0.5)  # not even alone: declining cannot save it
    assert admit_decodes(COST, load, t_with * 1.01, 0.0, [hopeless]) == [True]
    assert admit_decodes(COST, load, t_with * 0.99, 0.0, [hopeless]) == [False]  # the others' pace binds
    savable = GateCandidate(4, 2000, (t_alone + t_with) / 2)  # keeps pace alone, not in this batch
    assert admit_decodes(COST, load, t_with * 1.01, 0.0, [savable]) == [False]
    # A batch pace below the engine's floor (an iteration of 4 tokens, no context): no batch
    # keeps it, so it does not hold newcomers back; a huge one still cannot join a keepable pace.
    floor = COST.iteration_time(0, 4, 3, 0, 3)
    assert admit_decodes(COST, load, floor * 0.9, 0.0, [GateCandidate(4, 2000, 1.0)]) == [True]
    assert admit_decodes(COST, load, floor * 1.5, 0.0, [GateCandidate(4, 2_000_000, 1.0)]) == [False]


def test_arrival_rate_decays_to_the_window_average():
    a = ArrivalRate(window_s=2.0)
    for i in range(2000):  # 100 tokens every 10 ms = 10k tokens/s
        a.add(i * 0.01, 100)
    assert a.rate(20.0) == pytest.approx(10_000, rel=0.03)
    assert a.rate(30.0) < 100  # five windows later


def _with_waiting(profile, n_dec: int, n_wait: int, tpot_s: float = 0.02):
    st = _decoders(profile, n_dec, tpot_s=tpot_s, ctx_tokens=1000)
    st.kv_free_tokens = 10**8  # KV never binds here: only the decode gate may decline
    for i in range(n_wait):
        st.add(protos.RequestArrived(f"w{i}", 200, 300, protos.Slo(2.0, 0.03, slo_class="coding"), st.now_s))
    return st


def test_unified_gate_declines_admissions_the_decode_batch_cannot_carry():
    profile = PROFILE
    acc = AcceptanceModel(profile.acceptance_priors)
    admitted = {}
    for gate in (True, False):
        st = _with_waiting(profile, 500, 60)
        policy = make_policy("slo_unified", decode_gate=gate)
        plan = policy.plan(PlanContext(st, profile.cost, acc, st.now_s, step=1))
        check_plan_invariants(st, plan)
        admitted[gate] = sum(d.decision == protos.Decision.ADMIT for d in plan.decisions)
        if gate:
            assert policy.counters["gated"] > 0
    assert admitted[True] < admitted[False]
    # A light batch: the gate lets every TTFT-feasible request in.
    st = _with_waiting(profile, 10, 5)
    policy = make_policy("slo_unified")
    plan = policy.plan(PlanContext(st, profile.cost, acc, st.now_s, step=1))
    assert sum(d.decision == protos.Decision.ADMIT for d in plan.decisions) == 5 and policy.counters["gated"] == 0


def test_unified_gate_config_is_checked():
    with pytest.raises(ValueError, match="decode-gate"):
        make_policy("slo_unified", gate_safety=0.0)


def test_unified_gate_lets_later_calls_of_an_admitted_agent_session_through():
    profile, acc = PROFILE, AcceptanceModel(PROFILE.acceptance_priors)
    policy = make_policy("slo_unified", gate_sessions=False)

    def call(st, rid, session):  # a later TTFT deadline than the w* requests: last in EDF order
        st.add(protos.RequestArrived(rid, 200, 300, protos.Slo(5.0, 0.03, slo_class="tool-call"), st.now_s,
                                     session_id=session))

    light = _with_waiting(profile, 10, 0)
    call(light, "s1-c0", "s1")
    plan = policy.plan(PlanContext(light, profile.cost, acc, light.now_s, step=1))
    assert ("s1-c0", protos.Decision.ADMIT) in [(d.rid, d.decision) for d in plan.decisions]
    heavy = _with_waiting(profile, 500, 60)  # the gate binds: most w* are declined
    call(heavy, "s1-c1", "s1")
    call(heavy, "s2-c0", "s2")
    plan = policy.plan(PlanContext(heavy, profile.cost, acc, heavy.now_s, step=2))
    check_plan_invariants(heavy, plan)
    admitted = {d.rid for d in plan.decisions if d.decision == protos.Decision.ADMIT}
    assert len([r for r in admitted if r.startswith("w")]) < 60
    assert "s1-c1" in admitted and "s2-c0" not in admitted
