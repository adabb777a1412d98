"""eval.metrics on hand-built records: both attainment definitions, stages, misses, goodput."""

import pytest

from eval.metrics import Outcome, RequestRecord, meets_adaserve, meets_slos_serve, summarize
from protos.messages import Slo, Stage

SLO = Slo(ttft_s=0.5, tpot_s=0.1, slo_class="chat")
THINK = Slo(ttft_s=0.5, tpot_s=0.03, stages=[Stage(tpot_s=0.03), Stage(tpot_s=0.1)], slo_class="reasoning")


def rec(times, slo=SLO, arrival=0.0, outcome=Outcome.FINISHED, stage_starts=(0,), admitted=True, rid="r"):
    return RequestRecord(rid=rid, slo=slo, arrival_s=arrival, token_times=list(times),
                         stage_starts=list(stage_starts), outcome=outcome, admitted=admitted)


def test_tokens_exactly_on_deadline_meet_both():
    r = rec([0.5 + 0.1 * i for i in range(10)])
    assert meets_slos_serve(r) and meets_adaserve(r)


def test_one_late_token_fails_deadlines_but_not_mean_tpot():
    times = [0.5 + 0.1 * i for i in range(10)]
    times[2] = 0.75  # due at 0.5 + 2 * 0.1 = 0.7
    r = rec(times)
    assert not meets_slos_serve(r)
    assert meets_adaserve(r)  # mean gap (1.0 - 0.1) / 9 = 0.1


def test_t0_is_max_of_ttft_deadline_and_first_token():
    # first token early at 0.1; later tokens may follow the schedule anchored at 0.5
    r = rec([0.1, 0.6, 0.7, 0.8])
    assert meets_slos_serve(r)
    # first token late (0.6 > 0.5): TTFT miss under SLOs-Serve, AdaServe ignores TTFT
    late = rec([0.6, 0.7, 0.8])
    assert not meets_slos_serve(late) and meets_adaserve(late)


def test_mean_tpot_over_slo_fails_adaserve():
    r = rec([0.2 + 0.12 * i for i in range(5)])
    assert not meets_adaserve(r)


def test_stage_aware_deadlines():
    think = [0.5 + 0.03 * i for i in range(20)]  # 20 think tokens at 30 ms
    answer = [think[-1] + 0.1 * (i + 1) for i in range(10)]  # 10 answer tokens at 100 ms
    r = rec(think + answer, slo=THINK, stage_starts=(0, 20))
    assert meets_slos_serve(r) and meets_adaserve(r)
    # the same stream judged without the stage switch (30 ms throughout) misses
    flat = rec(think + answer, slo=Slo(ttft_s=0.5, tpot_s=0.03), stage_starts=(0,))
    assert not meets_slos_serve(flat) and not meets_adaserve(flat)
    # think tokens at 40 ms break the tight stage even though the answer is fast
    slow_think = [0.5 + 0.04 * i for i in range(20)]
    fast_answer = [slow_think[-1] + 0.01 * (i + 1) for i in range(10)]
    r2 = rec(slow_think + fast_answer, slo=THINK, stage_starts=(0, 20))
    assert not meets_slos_serve(r2) and not meets_adaserve(r2)


def test_stage_ttft_allowance():
    slo = Slo(ttft_s=0.5, tpot_s=0.03, stages=[Stage(tpot_s=0.03), Stage(tpot_s=0.1, ttft_s=0.4)])
    think = [0.5 + 0.03 * i for i in range(5)]
    answer = [think[-1] + 0.1 + 0.35] + [think[-1] + 0.45 + 0.1 * (i + 1) for i in range(3)]
    assert meets_slos_serve(rec(think + answer, slo=slo, stage_starts=(0, 5)))
    no_allow = Slo(ttft_s=0.5, tpot_s=0.03, stages=[Stage(tpot_s=0.03), Stage(tpot_s=0.1)])
    assert not meets_slos_serve(rec(think + answer, slo=no_allow, stage_starts=(0, 5)))


@pytest.mark.parametrize("outcome", [Outcome.REJECTED, Outcome.UNFINISHED, Outcome.CANCELLED, Outcome.FAILED])
def test_not_finished_is_a_miss(outcome):
    r = rec([0.5, 0.6], outcome=outcome)
    assert not meets_slos_serve(r) and not meets_adaserve(r)


def test_demoted_to_best_effort_misses_slos_serve_only():
    r = rec([0.5, 0.6], admitted=False)
    assert not meets_slos_serve(r) and meets_adaserve(r)


def test_check_every_relaxes_intermediate_tokens():
    times = [0.5, 0.65, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4]  # token 2 late (due 0.6)
    assert not meets_slos_serve(rec(times))
    assert meets_slos_serve(rec(times), check_every=5)


def test_summarize_per_class_goodput_and_percentiles():
    good = rec([0.5 + 0.1 * i for i in range(10)], rid="a")
    bad = rec([2.0, 2.1], rid="b")  # TTFT miss
    rej = rec([], outcome=Outcome.REJECTED, rid="c")
    code = rec([0.2, 0.23], slo=Slo(ttft_s=0.5, tpot_s=0.03, slo_class="coding"), rid="d")
    s = summarize([good, bad, rej, code], elapsed_s=10.0)
    chat = s["classes"]["chat"]
    assert chat["requests"] == 3 and chat["rejected"] == 1
    assert chat["attainment_slos_serve"] == pytest.approx(1 / 3)
    assert chat["attainment_adaserve"] == pytest.approx(2 / 3)
    assert s["classes"]["coding"]["attainment_slos_serve"] == 1.0
    o = s["overall"]
    assert o["goodput_rps"] == pytest.approx(2 / 10)
    assert o["goodput_tps"] == pytest.approx((10 + 2) / 10)
    assert o["ttft_p50_s"] == pytest.approx(0.5)  # TTFTs 0.5, 2.0, 0.2
    assert o["tpot_p50_s"] == pytest.approx(0.1)


def test_session_attainment_needs_every_call():
    ok1 = rec([0.5, 0.6], rid="a1")
    ok2 = rec([2.5, 2.6], arrival=2.0, rid="a2")
    late = rec([3.0, 3.1], arrival=2.0, rid="b2")  # TTFT miss
    cancelled = rec([], outcome=Outcome.CANCELLED, rid="c2")
    for r, s in ((ok1, "A"), (ok2, "A"), (late, "B"), (cancelled, "C")):
        r.session_id = s
    sess = summarize([ok1, ok2, late, cancelled], 1.0)["sessions"]
    assert sess["sessions"] == 3 and sess["calls"] == 4
    full = summarize([ok1, ok2, late, cancelled, rec([0.5, 0.6], rid="x")], 1.0)
    assert full["sessions"]["attainment_slos_serve"] == pytest.approx(1 / 3)  # only A
    assert full["sessions"]["attainment_adaserve"] == pytest.approx(2 / 3)  # A and B (TTFT ignored)
