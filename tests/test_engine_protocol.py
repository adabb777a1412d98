"""The engine's protocol surface: hello, arrivals, iteration reports, finishes, resync, plan
application (budget, chunks, admission decisions, validity) as seen on the wire."""

from __future__ import annotations

import pytest

from protos import messages as protos
from sglang_slo.engine.request import SamplingParams
from test_engine_factories import SLO, make_engine, tiny_pair

FR, D = protos.FinishReason, protos.Decision


@pytest.fixture(scope="module")
def pair():
    return tiny_pair(seed=8)


def roundtrip(msg):
    return protos.decode(protos.encode(msg))


def test_hello_describes_the_engine_and_passes_the_planner_check(pair):
    eng = make_engine(*pair, max_depth=5, max_width=2, max_batch_tokens=300)
    hello = roundtrip(eng.hello())
    assert protos.check_hello(hello) == ""
    assert hello.engine == "embedded" and hello.max_depth == 5 and hello.max_width == 2
    assert protos.SpecMode.TREE in hello.spec_modes and hello.max_batch_tokens == 300
    assert hello.kv_capacity_tokens == 4096 and hello.kv_block_tokens == 4
    plain = make_engine(pair[0]).hello()
    assert plain.spec_modes == [protos.SpecMode.NONE] and plain.max_depth == 0


def test_reports_follow_the_plan_and_count_tokens(pair):
    eng = make_engine(*pair)
    arrived = eng.add_request("a", list(range(1, 31)), SamplingParams(max_new_tokens=6, ignore_eos=True), SLO)
    eng.add_request("b", list(range(1, 11)), SamplingParams(max_new_tokens=6, ignore_eos=True), SLO)
    assert roundtrip(arrived) == arrived and arrived.prompt_tokens == 30
    # Plan: prefill 12 of a, defer b.
    eng.apply_plan(protos.Plan(step=0, valid_until_s=eng.clock() + 60, token_budget=64,
                               prefill=[protos.PrefillChunk("a", 12)],
                               decisions=[protos.AdmissionDecision("b", D.DEFER)]))
    rep = eng.step().report
    assert roundtrip(rep) == rep
    assert rep.plan_step == 0 and rep.prefill_tokens == 12 and rep.verify_tokens == 0
    assert [(p.rid, p.prefilled, p.prefill_tokens) for p in rep.progress] == [("a", 12, 12)]
    assert rep.waiting == 1 and rep.kv_free_tokens == 4096 - 12
    # Next plan: finish a's prompt and decode with a depth-3 chain; admit b with a chunk.
    eng.apply_plan(protos.Plan(step=1, valid_until_s=eng.clock() + 60, token_budget=64,
                               prefill=[protos.PrefillChunk("a", 100), protos.PrefillChunk("b", 4)]))
    rep = eng.step().report
    assert rep.prefill_tokens == 18 + 4 and {p.rid: p.decoded for p in rep.progress} == {"a": 1, "b": 0}
    first = next(p for p in rep.progress if p.rid == "a").first_token_s
    assert rep.start_s <= first <= rep.end_s
    eng.apply_plan(protos.Plan(step=2, valid_until_s=eng.clock() + 60, token_budget=64,
                               decode=[protos.DecodeEntry("a", min_tokens=2.0, tree_cap=4, depth=3, width=1)]))
    rep = eng.step().report
    pa = next(p for p in rep.progress if p.rid == "a")
    assert rep.draft_steps == 3 and pa.verified == 3 and pa.depth == 3 and 0 < pa.draft_conf <= 1
    assert pa.decoded == 2 + pa.accepted and rep.verify_tokens == 4
    assert rep.forward_s > 0 and rep.context_tokens > 0
    # A stale plan: the fallback runs and says so.
    eng.apply_plan(protos.Plan(step=3, valid_until_s=eng.clock() - 1, token_budget=64))
    rep = eng.step().report
    assert rep.plan_step == -1
    while eng.has_work:
        out = eng.step()
    assert eng.tables.free_tokens == 4096


def test_finished_events_and_rejection(pair):
    eng = make_engine(*pair)
    eng.add_request("x", [1, 2, 3], SamplingParams(max_new_tokens=3, ignore_eos=True), SLO)
    eng.add_request("y", [1, 2, 3], SamplingParams(max_new_tokens=3), SLO)
    eng.apply_plan(protos.Plan(step=0, valid_until_s=eng.clock() + 60, token_budget=64,
                               prefill=[protos.PrefillChunk("x", 3)],
                               decisions=[protos.AdmissionDecision("y", D.REJECT)]))
    out = eng.step()
    fins = [e for e in out.events if isinstance(e, protos.RequestFinished)]
    assert [(f.rid, f.reason) for f in fins] == [("y", FR.REJECTED)]
    assert isinstance(out.events[0], protos.IterationReport)  # report first, then this step's finishes
    events = []
    while eng.has_work:
        events += eng.step().events
    fin = [e for e in events if isinstance(e, protos.RequestFinished)]
    assert [(f.rid, f.reason, f.decoded) for f in fin] == [("x", FR.LENGTH, 3)]
    # Abort: the event goes out with the next step, the KV is free at once.
    eng.add_request("z", list(range(1, 20)), SamplingParams(max_new_tokens=50), SLO)
    # The plan (still valid) does not mention z: it waits for the planner.
    assert eng.step().report.waiting == 1 and eng.tables.free_tokens == 4096
    eng.apply_plan(protos.Plan(step=9, valid_until_s=eng.clock() - 1, token_budget=64))  # stale
    eng.step()  # the fallback (EDF) admits it
    assert eng.tables.free_tokens < 4096
    eng.abort("z")
    assert eng.tables.free_tokens == 4096 and eng.abort("z") is None
    out = eng.step()
    assert [(f.rid, f.reason) for f in out.finished] == [("z", FR.ABORT)]


def test_resync_carries_the_in_flight_state(pair):
    eng = make_engine(*pair)
    eng.add_request("p", list(range(1, 9)), SamplingParams(max_new_tokens=9), SLO, session_id="s1")
    eng.add_request("q", list(range(1, 5)), SamplingParams(max_new_tokens=9), SLO)
    eng.apply_plan(protos.Plan(step=0, valid_until_s=eng.clock() + 60, token_budget=64,
                               prefill=[protos.PrefillChunk("p", 8)]))
    eng.step()
    eng.step()
    rs = roundtrip(eng.resync())
    snaps = {s.arrived.rid: s for s in rs.requests}
    assert rs.step == 2 and set(snaps) == {"p", "q"}
    assert snaps["p"].prefilled == 8 and snaps["p"].decoded >= 1 and snaps["p"].arrived.session_id == "s1"
    assert snaps["p"].decision == D.ADMIT and snaps["q"].prefilled == 0
    assert rs.kv_free_tokens == eng.tables.free_tokens
