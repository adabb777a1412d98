"""ReqState: phases and SLOs-Serve deadlines (stage-aware) from protocol messages."""

from __future__ import annotations

import pytest

from protos import messages as m
from sidecar.cost_model import EngineLimits
from sidecar.state import PlannerState, ReqState


def _req(prompt=100, max_new=50, slo=None, arrival=10.0, cached=0) -> ReqState:
    return ReqState.from_arrived(m.RequestArrived("r", prompt, max_new, slo or m.Slo(1.0, 0.05), arrival, cached_prefix_tokens=cached))


def test_single_stage_deadlines():
    r = _req()
    assert r.ttft_deadline_s == 11.0
    assert r.token_deadline(1) == 11.0
    assert r.token_deadline(11) == pytest.approx(11.5)
    r.first_token_s = 11.4  # late first token moves the anchor (t0 = max(...))
    assert r.token_deadline(3) == pytest.approx(11.5)
    r.first_token_s = 10.3  # early first token does not tighten it
    assert r.token_deadline(3) == pytest.approx(11.1)


def test_multi_stage_deadlines_use_each_stage_tpot():
    slo = m.Slo(1.0, 0.03, stages=[m.Stage(0.03, tokens=10), m.Stage(0.1, ttft_s=0.2)])
    r = _req(slo=slo)
    # tokens 2..10 at 30 ms; token 11 opens stage 1: +0.2 s allowance + 100 ms
    assert r.token_deadline(10) == pytest.approx(11.0 + 9 * 0.03)
    assert r.token_deadline(11) == pytest.approx(11.0 + 9 * 0.03 + 0.2 + 0.1)
    assert r.tpot_now == 0.03


def test_stage_that_runs_long_keeps_its_tpot_until_the_engine_switches():
    slo = m.Slo(1.0, 0.03, stages=[m.Stage(0.03, tokens=10), m.Stage(0.1)])
    r = _req(slo=slo)
    r.prefilled, r.decoded = 100, 15  # 15 tokens, still reported in stage 0
    assert r.token_deadline(17) - r.token_deadline(16) == pytest.approx(0.1)  # planned switch at >= 15
    r.apply_progress(m.RequestProgress("r", 100, 20, stage=1))
    assert r.stage == 1 and r.stage_starts == [0, 15]
    assert r.tpot_now == 0.1
    assert r.token_deadline(15) - r.token_deadline(14) == pytest.approx(0.03)
    assert r.token_deadline(17) - r.token_deadline(16) == pytest.approx(0.1)


def test_phases_and_cached_prefix():
    r = _req(prompt=100, cached=100)
    assert r.prefilled == 99 and r.remaining_prefill == 1  # the last token is always computed
    assert r.is_waiting and not r.is_decoding
    r.apply_progress(m.RequestProgress("r", 100, 1, prefill_tokens=1, first_token_s=10.5))
    assert r.is_admitted and r.is_decoding  # the engine started it: admitted
    assert r.first_token_s == 10.5 and r.kv_tokens == 101


def test_planner_state_views_and_kv_available():
    st = PlannerState(limits=EngineLimits(1000, 64, 4, 1))
    a = st.add(m.RequestArrived("a", 100, 100, m.Slo(1, 0.1), 0.0))
    b = st.add(m.RequestArrived("b", 50, 10, m.Slo(1, 0.1), 0.1))
    st.add(m.RequestArrived("c", 50, 10, m.Slo(1, 0.1), 0.2))
    a.decision = m.Decision.ADMIT
    a.prefilled, a.decoded = 100, 20
    b.decision = m.Decision.ADMIT
    b.prefilled = 20
    st.kv_free_tokens = 800
    assert [r.rid for r in st.decoding()] == ["a"]
    assert [r.rid for r in st.running()] == ["a", "b"]
    assert [r.rid for r in st.waiting()] == ["c"]
    # 800 free - b's 30 prompt tokens - half of the remaining outputs (80 + 10)
    assert st.kv_available(0.5) == 800 - 30 - 40 - 5


def test_engine_side_preemption_puts_the_request_back_in_waiting():
    r = _req(prompt=100)
    r.apply_progress(m.RequestProgress("r", 100, 5, prefill_tokens=100))
    assert r.is_decoding
    r.prefilled = 150  # an in-flight projection above the report must not look like a preemption
    r.apply_progress(m.RequestProgress("r", 100, 6))
    assert r.is_decoding
    r.apply_progress(m.RequestProgress("r", 0, 6))  # KV gone (engine preempted it)
    assert r.is_waiting and r.decision == m.Decision.PREEMPT
    assert r.remaining_prefill == 105  # prompt + all output but the next decode root
    r.apply_progress(m.RequestProgress("r", 40, 6, prefill_tokens=40))  # the engine restarted it itself
    assert r.is_admitted and not r.is_decoding and r.remaining_prefill == 65
    r.apply_progress(m.RequestProgress("r", 105, 6, prefill_tokens=65))  # recompute done (uncapped report)
    assert r.is_decoding
    r.apply_progress(m.RequestProgress("r", 100, 8, verified=2, accepted=1, depth=2))  # decoding again
    assert r.is_decoding and r.prompt_tokens == 100 and r.remaining_prefill == 0


from hypothesis import given, settings, strategies as st  # noqa: E402

stage_st = st.builds(m.Stage, tpot_s=st.floats(0.001, 0.5), tokens=st.integers(0, 50), ttft_s=st.floats(0.0, 1.0))


@settings(max_examples=200, deadline=None)
@given(stages=st.lists(stage_st, max_size=4), decoded=st.integers(0, 120), stage=st.integers(0, 3),
       first=st.floats(0.0, 15.0))
def test_deadlines_never_decrease_and_match_slos_serve_for_two_stages(stages, decoded, stage, first):
    slo = m.Slo(1.0, stages[0].tpot_s if stages else 0.05, stages=stages)
    r = _req(slo=slo)
    r.prefilled, r.first_token_s = 100, first
    r.apply_progress(m.RequestProgress("r", 100, decoded, stage=min(stage, max(0, len(stages) - 1))))
    ds = [r.token_deadline(n) for n in range(1, 150)]
    assert all(b >= a for a, b in zip(ds, ds[1:]))
    assert ds[0] == pytest.approx(max(11.0, first))
    if len(stages) == 2 and stages[0].tokens > 0 and r.stage == 0 and decoded <= stages[0].tokens:
        g, t0 = stages[0].tokens, max(11.0, first)
        for n in (1, g, g + 1, g + 7):  # ttnt(n) = (min(g, n) - 1) tpot_0 + max(n - g, 0) tpot_1 (+ stage-1 allowance)
            extra = stages[1].ttft_s if n > g else 0.0
            want = t0 + (min(g, n) - 1) * stages[0].tpot_s + max(n - g, 0) * stages[1].tpot_s + extra
            assert r.token_deadline(n) == pytest.approx(want)
