"""Every plugin hook against SGLang 0.5.23's real classes (no server).

Real: Req, SamplingParams, PrefillAdder + token KV allocator + radix cache, SchedulePolicy,
Scheduler methods (wrapped exactly as SGLang's HookRegistry wraps them) on an
`object.__new__(Scheduler)` shell, AdaptiveSpeculativeParams, ZeroMQ sockets.
"""

from __future__ import annotations

import json
import pickle
import sys
import time

import pytest

pytest.importorskip("sglang", reason="SGLang is not installed (make sglang-cpu)")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from protos.channel import PlannerChannel, ipc_endpoint  # noqa: E402
from protos.messages import (  # noqa: E402
    PROTOCOL_VERSION, Decision, EngineHello, FinishReason, IterationReport, PlannerWelcome, RequestArrived,
    RequestFinished, Resync,
)
from sglang_slo.sglang_plugin import hooks, targets  # noqa: E402
from sglang_slo.sglang_plugin.plan_state import PlannerUpdate, PlanState, PlanView  # noqa: E402
from sglang_slo.sglang_plugin.scheduler_state import SloSchedulerState  # noqa: E402
from tests.sglang_support.factories import (  # noqa: E402
    adder_args, kv_and_cache, make_plan, make_req, publish_config, run_prefill_pass, scheduler_shell,
)
from tests.sglang_support.tiny_llama import make_tiny_llama  # noqa: E402

from sglang.srt.managers.schedule_policy import AddReqResult, PrefillAdder, SchedulePolicy  # noqa: E402
from sglang.srt.managers.scheduler import Scheduler  # noqa: E402
from sglang.srt.plugins.hook_registry import HookType, _wrap_fn  # noqa: E402
from sglang.utils import TypeBasedDispatcher  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def sglang_config(tmp_path_factory):
    publish_config(make_tiny_llama(tmp_path_factory.mktemp("tiny")))


class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def hooked(target_fn, hook, kind):
    """`target_fn` wrapped exactly as SGLang's HookRegistry.apply_hooks wraps it."""
    return _wrap_fn(target_fn, hook, kind)


def state_for(sched, **kw) -> SloSchedulerState:
    sched.slo_state = SloSchedulerState(sched, endpoint=kw.pop("endpoint", None), **kw)
    return sched.slo_state


# ------------------------------------------------------------------ start-up check


def test_every_target_exists_with_expected_signature():
    assert targets.problems() == []


def test_missing_target_refuses_to_start_naming_it(monkeypatch):
    bogus = targets.Target("sglang.srt.managers.scheduler.Scheduler.no_such_hook", ("self",), "test")
    monkeypatch.setattr(targets, "TARGETS", targets.TARGETS + (bogus,))
    with pytest.raises(targets.UnsupportedSglangError) as e:
        try:
            targets.check_targets()
        except Exception:  # what SGLang's load_plugins() catches: must not swallow the refusal
            pytest.fail("the refusal was an Exception; SGLang's plugin loader would swallow it")
    assert "Scheduler.no_such_hook" in str(e.value) and "sglang==0.5.23" in str(e.value)


def test_changed_signature_refuses(monkeypatch):
    moved = targets.Target("sglang.srt.managers.scheduler.Scheduler._should_defer_prefill", ("self", "batch"), "t")
    monkeypatch.setattr(targets, "TARGETS", (moved,))
    found = targets.problems()
    assert len(found) == 1 and "('self', 'running_batch')" in found[0]


# ------------------------------------------------------------------ SLO intake


def test_slo_becomes_absolute_deadlines_on_req():
    sched = scheduler_shell(enable_priority_scheduling=True)
    state_for(sched, clock=FakeClock(50.0))
    create = hooked(Scheduler._create_generation_req, hooks.attach_request_slo, HookType.AFTER)
    base = make_req(10, rid="x", slo={"ttft_ms": 300, "tpot_ms": 40})
    req = create(sched, None, "x", "", base.origin_input_ids, base.sampling_params, priority=None, vocab_size=512)
    assert req.slo.ttft_deadline_s == pytest.approx(50.3)
    assert req.slo.token_deadline_s(3) == pytest.approx(50.3 + 2 * 0.040)
    assert req.to_finish is None
    assert req.priority == req.slo.slo.priority  # the class priority, for SGLang's priority queue


def test_explicit_priority_wins():
    sched = scheduler_shell(enable_priority_scheduling=True)
    state_for(sched)
    req = make_req(10, slo={"ttft_ms": 300, "tpot_ms": 40}, priority=7)
    hooks.attach_request_slo(req, sched, None)
    assert req.priority == 7 and req.slo.slo.priority == 7


@pytest.mark.parametrize("slo, field", [({"ttft_ms": -5, "tpot_ms": 40}, "ttft_ms"), ({"tpot_ms": "fast"}, "tpot_ms"),
                                        ({"bogus": 1}, "bogus")])
def test_invalid_slo_aborts_that_request_with_clear_error(slo, field):
    sched = scheduler_shell()
    state_for(sched)
    req = make_req(10, slo=slo)
    hooks.attach_request_slo(req, sched, None)
    assert type(req.to_finish).__name__ == "FINISH_ABORT"
    assert "invalid SLO" in req.to_finish.message and field in req.to_finish.message
    assert not hasattr(req, "slo")


# ------------------------------------------------------------------ planner link + broadcast


def test_plan_update_survives_pickle_broadcast_and_reaches_dispatcher():
    sched = scheduler_shell()
    hooks.route_planner_updates(None, sched)
    update = pickle.loads(pickle.dumps(PlannerUpdate(plan=make_plan(step=9, prefill={"a": 5}))))  # broadcast_pyobj
    assert sched._request_dispatcher(update) is None
    assert sched.slo_state.plan.step == 9 and sched.slo_state.plan.view.prefill_tokens == {"a": 5}


def test_plan_state_keeps_newest_and_expires():
    ps = PlanState()
    ps.apply(PlannerUpdate(plan=make_plan(step=5)))
    ps.apply(PlannerUpdate(plan=make_plan(step=3)))  # late, older plan: ignored
    assert ps.step == 5
    assert not ps.expired
    ps.apply(PlannerUpdate(expire=True))
    assert ps.view is None and ps.step == -1 and ps.expired
    ps.apply(PlannerUpdate(plan=make_plan(step=6)))
    assert not ps.expired


def _planner(endpoint):
    return PlannerChannel(endpoint)


def _poll_until(poll, sched, clock, pred, tries=300):
    """Poll like the scheduler loop does (clock moving) until `pred(output)` holds."""
    for _ in range(tries):
        out = poll(sched)
        if pred(out):
            return out
        clock.t += 0.6  # past the link's hello retry interval
        time.sleep(0.02)
    raise AssertionError("condition never held")


def _recv(planner, kind, tries=50):
    for _ in range(tries):
        got = planner.recv(100)
        if got is not None and isinstance(got[1], kind):
            return got
    raise AssertionError(f"no {kind.__name__} received")


def _welcomed_link(name: str):
    """A rank-0 scheduler shell whose planner link has handshaken with a test planner."""
    endpoint = ipc_endpoint(name)
    planner = _planner(endpoint)
    sched = scheduler_shell()
    sched.token_to_kv_pool_allocator = kv_and_cache()[0]
    clock = FakeClock()
    state = state_for(sched, endpoint=endpoint, clock=clock)
    poll = hooked(Scheduler._poll_timeout_aborts, hooks.poll_planner, HookType.AFTER)
    _poll_until(poll, sched, clock, lambda out: state.link.state.value == "waiting")
    engine, _ = _recv(planner, EngineHello)
    planner.send(engine, PlannerWelcome(protocol_version=PROTOCOL_VERSION, accepted=True, policy="t"))
    _poll_until(poll, sched, clock, lambda out: state.link.up)
    return endpoint, planner, state, clock, poll, sched


def test_rank0_poll_handshakes_and_broadcasts_plans_over_zmq():
    endpoint = ipc_endpoint("test-plugin")
    planner = _planner(endpoint)
    clock = FakeClock()
    sched = scheduler_shell()
    sched.token_to_kv_pool_allocator = kv_and_cache()[0]
    state = state_for(sched, endpoint=endpoint, clock=clock)
    sched._request_dispatcher += TypeBasedDispatcher([(PlannerUpdate, state.apply_update)])  # as the hook does
    poll = hooked(Scheduler._poll_timeout_aborts, hooks.poll_planner, HookType.AFTER)
    try:
        _poll_until(poll, sched, clock, lambda out: out == [] and state.link.state.value == "waiting")  # hello sent
        engine, hello = _recv(planner, EngineHello)
        assert hello.engine == "sglang" and hello.kv_capacity_tokens == 4096
        planner.send(engine, PlannerWelcome(protocol_version=PROTOCOL_VERSION, accepted=True, policy="t"))
        _poll_until(poll, sched, clock, lambda out: state.link.up)
        _recv(planner, Resync)
        req = make_req(20, rid="q1", slo={"ttft_ms": 500, "tpot_ms": 50})
        hooks.attach_request_slo(req, sched, None)  # arrives while the link is up:
        sched.waiting_queue.append(req)
        poll(sched)  # announced on the next loop pass
        _, arrived = _recv(planner, RequestArrived)
        assert arrived.rid == "q1" and arrived.prompt_tokens == 20 and arrived.slo.ttft_s == pytest.approx(0.5)
        planner.send(engine, make_plan(step=4, prefill={"q1": 8}, valid_until_s=clock.t + 1.0))
        out = _poll_until(poll, sched, FakeClock(), bool)  # (a frozen clock: the plan must stay fresh)
        assert len(out) == 1 and isinstance(out[0], PlannerUpdate) and out[0].plan.step == 4
        for item in out:  # what every rank's dispatcher does with the broadcast list
            sched._request_dispatcher(item)
        assert state.plan.view.prefill_tokens == {"q1": 8}
        clock.t += 2.0  # past valid_until_s: rank 0 broadcasts the expiry, every rank falls back
        out = poll(sched)
        assert [u.expire for u in out] == [True]
        sched._request_dispatcher(out[0])
        assert state.plan.view is None
        planner.send(engine, make_plan(step=6, decisions={"q1": Decision.REJECT}, valid_until_s=clock.t + 1))
        out = _poll_until(poll, sched, FakeClock(), bool)
        aborts = [o for o in out if type(o).__name__ == "AbortReq"]
        assert aborts and aborts[0].rid == "q1" and "rejected by the SLO planner" in aborts[0].abort_message
        _, fin = _recv(planner, RequestFinished)
        assert fin.rid == "q1" and fin.reason == FinishReason.REJECTED
    finally:
        state.link.close()
        planner.close()


def test_dead_planner_never_blocks_and_link_goes_down():
    endpoint, planner, state, clock, poll, sched = _welcomed_link("test-plugin-dead")
    planner.close()  # the planner dies
    t0 = time.perf_counter()
    for _ in range(50):
        clock.t += 0.1
        state.poll()
        state.link.send(IterationReport(step=1, start_s=0, end_s=0, plan_step=-1, prefill_tokens=0, verify_tokens=0,
                                        draft_steps=0, context_tokens=0, kv_free_tokens=0), clock.t)
        time.sleep(0.005)
    assert time.perf_counter() - t0 < 5.0
    assert not state.link.up
    state.link.close()


def test_restarted_planner_at_same_endpoint_gets_a_new_handshake():
    endpoint, planner, state, clock, poll, sched = _welcomed_link("test-plugin-restart")
    planner.close()
    planner = _planner(endpoint)  # a fresh planner: ZeroMQ reconnects silently, it knows nothing
    time.sleep(0.5)  # let the DEALER reconnect, so the report below is delivered
    try:
        report = IterationReport(step=1, start_s=0, end_s=0, plan_step=-1, prefill_tokens=0, verify_tokens=0,
                                 draft_steps=0, context_tokens=0, kv_free_tokens=0)
        assert state.link.send(report, clock.t)  # delivered, unanswered: the planner ignores unknown engines
        _poll_until(poll, sched, clock, lambda out: not state.link.up)  # silence -> DOWN
        hello = None
        for _ in range(200):  # the scheduler loop keeps polling; the engine handshakes again
            poll(sched)
            clock.t += 0.6
            got = planner.recv(20)
            if got is not None and isinstance(got[1], EngineHello):
                hello = got[1]
                break
        assert hello is not None and hello.engine == "sglang"
    finally:
        state.link.close()
        planner.close()


def test_iteration_log_has_one_json_line_per_report_matching_what_the_planner_got(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from sglang.srt.managers.schedule_batch import ScheduleBatch
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    log_path = tmp_path / "iterations.jsonl"
    monkeypatch.setenv("SGLANG_SLO_REPORT_LOG", str(log_path))
    endpoint, planner, state, clock, poll, sched = _welcomed_link("test-plugin-log")
    try:
        _recv(planner, Resync)
        a, b = make_req(30, "a"), make_req(20, "b")
        a.output_ids.extend([5, 6])
        b.output_ids.append(7)
        sent = []
        for it, (mode, reqs) in enumerate([(ForwardMode.EXTEND, [b]), (ForwardMode.DECODE, [a, b])]):
            batch = ScheduleBatch(reqs=reqs, forward_mode=mode, extend_lens=[20], prefix_lens=[0])
            batch.forward_iter, batch.launch_ts = it, clock.t
            state.note_launch(batch)
            clock.t += 0.003
            state.report(batch, SimpleNamespace())
            sent.append(_recv(planner, IterationReport)[1])
        lines = log_path.read_bytes().decode().splitlines()
        assert len(lines) == 2
        got = [json.loads(x) for x in lines]
        assert [g["step"] for g in got] == [r.step for r in sent] == [1, 2]
        assert [g["mode"] for g in got] == ["prefill", "decode"]
        assert got[0]["prefill"] == {"b": 20} and got[1]["prefill"] == {}
        assert got[1]["rids"] == ["a", "b"] and got[1]["plan_prefill"] is None and got[1]["plan_step"] == -1
        assert [(g["start_s"], g["end_s"]) for g in got] == [(r.start_s, r.end_s) for r in sent]
        assert got[1]["kv_free"] == sent[1].kv_free_tokens == 4096 and got[1]["link_up"] is True
    finally:
        state.link.close()
        planner.close()


# ------------------------------------------------------------------ prefill-or-decode


def test_defer_prefill_follows_plan_else_sglang():
    sched = scheduler_shell()
    state = state_for(sched)
    defer = hooked(Scheduler._should_defer_prefill, hooks.defer_prefill_by_plan, HookType.AROUND)
    from sglang.srt.managers.schedule_batch import ScheduleBatch

    running = ScheduleBatch(reqs=[make_req(8, "d")])
    assert defer(sched, running) is False  # no plan: SGLang's rule (interval 0 -> never defer)
    assert state.fallback == "no_plan"
    state.apply_update(PlannerUpdate(plan=make_plan(prefill={})))
    assert defer(sched, running) is True  # plan says: decode iteration
    assert state.fallback is None and state.building_plan is state.plan.view
    state.apply_update(PlannerUpdate(plan=make_plan(step=2, prefill={"a": 4})))
    assert defer(sched, running) is False
    state.apply_update(PlannerUpdate(expire=True))
    assert defer(sched, running) is False and state.fallback == "expired"


def test_decode_only_plan_does_not_idle_an_empty_engine():
    """Nothing running and no chunk left in the plan: SGLang's rules build this batch (a request
    that arrived after the plan was made prefills instead of waiting for the next plan)."""
    from sglang.srt.managers.schedule_batch import ScheduleBatch

    sched = scheduler_shell()
    state = state_for(sched)
    defer = hooked(Scheduler._should_defer_prefill, hooks.defer_prefill_by_plan, HookType.AROUND)
    state.apply_update(PlannerUpdate(plan=make_plan(prefill={}, decisions={"old": Decision.ADMIT})))
    assert defer(sched, ScheduleBatch(reqs=[])) is False
    assert state.fallback == "idle" and state.building_plan is None and state.plan_for_build() is None
    factory = hooked(Scheduler.get_prefill_adder_class, hooks.plan_prefill_adder, HookType.AROUND)(sched)
    alloc, cache = kv_and_cache()
    adder = factory(*adder_args(alloc, cache), max_prefill_bs=0, prefill_max_requests=None)
    new = make_req(20, "new")
    assert [r.rid for r in run_prefill_pass(adder, [new], cache)] == ["new"]  # SGLang admits it
    assert state.plan.view is not None  # the plan itself stays in force for the next build
    assert defer(sched, ScheduleBatch(reqs=[make_req(8, "d")])) is True and state.fallback is None


class _Mode:
    def __init__(self, extend: bool, mixed: bool = False):
        self.extend, self.mixed = extend, mixed

    def is_extend(self):
        return self.extend

    def is_mixed(self):
        return self.mixed


class _Launched:
    """What `after_launch` reads of a launched ScheduleBatch."""

    def __init__(self, reqs, extend=True, riders=()):
        self.reqs, self.decoding_reqs = list(reqs) + list(riders), list(riders)
        self.forward_mode = _Mode(extend, mixed=bool(riders))
        self.forward_iter, self.launch_ts = 1, 100.0


def test_a_plans_chunks_run_once_and_its_order_stands():
    """A plan stays in force until the next one arrives; a chunk that ran is not re-run by it
    (the planner counted it once), but its order and remaining chunks still apply."""
    from sglang.srt.managers.schedule_batch import ScheduleBatch

    sched = scheduler_shell()
    state = state_for(sched)
    defer = hooked(Scheduler._should_defer_prefill, hooks.defer_prefill_by_plan, HookType.AROUND)
    running = ScheduleBatch(reqs=[make_req(8, "d")])
    a, b, d = make_req(40, "a"), make_req(40, "b"), make_req(8, "d")
    state.apply_update(PlannerUpdate(plan=make_plan(prefill={"a": 16, "b": 8}, decode=["d"])))
    assert defer(sched, running) is False
    state.after_launch(_Launched([a], riders=[d]))  # a's chunk ran (d decoded alongside)
    assert state.plan.view.prefill_tokens == {"b": 8} and state.plan.view.rank == {"a": 0, "b": 1, "d": 2}
    assert defer(sched, running) is False  # b's chunk is still to run
    state.after_launch(_Launched([d], extend=False))  # a decode batch: no chunk ran
    assert state.plan.view.prefill_tokens == {"b": 8}
    state.after_launch(_Launched([b]))
    assert defer(sched, running) is True  # all chunks ran: decode until the next plan
    assert state.plan.view.step == 1 and state.plan.chunks_consumed == 2
    # A newer plan that arrived after the build is not consumed by the older plan's batch.
    state.apply_update(PlannerUpdate(plan=make_plan(step=2, prefill={"a": 16})))
    defer(sched, running)
    state.apply_update(PlannerUpdate(plan=make_plan(step=3, prefill={"a": 8})))
    state.after_launch(_Launched([a]))
    assert state.plan.view.prefill_tokens == {"a": 8}


def test_no_chunk_is_consumed_without_a_plan():
    ps = PlanState()
    ps.consume(["a"])
    assert ps.view is None and ps.chunks_consumed == 0


# ------------------------------------------------------------------ admission, chunks, budget


def _adder(plan, max_prefill=1000, chunk=256):
    from sglang_slo.sglang_plugin.prefill_adder import SloPrefillAdder

    alloc, cache = kv_and_cache()
    sched = scheduler_shell()
    state = state_for(sched)
    if plan is not None:
        state.apply_update(PlannerUpdate(plan=plan))
    factory = hooked(Scheduler.get_prefill_adder_class, hooks.plan_prefill_adder, HookType.AROUND)(sched)
    adder = factory(*adder_args(alloc, cache, max_prefill, chunk), max_prefill_bs=0, prefill_max_requests=None)
    assert isinstance(adder, SloPrefillAdder)
    return adder, cache


def test_plan_sets_admitted_set_and_chunk_sizes():
    a, b, c = make_req(100, "a"), make_req(300, "b"), make_req(50, "c")
    adder, cache = _adder(make_plan(budget=400, prefill={"b": 120, "c": 50}))
    queue = [a, b, c]
    SchedulePolicy._sort_by_priority_and_fcfs  # noqa: B018 -- (SGLang's sort runs first in the hook)
    from sglang_slo.sglang_plugin.queue_order import order_waiting_queue

    order_waiting_queue(queue, adder.plan, edf_fallback=False)
    assert [r.rid for r in queue] == ["b", "c", "a"]
    admitted = run_prefill_pass(adder, queue, cache)
    assert [r.rid for r in admitted] == ["b", "c"]
    assert b.extend_len == 120 and adder.new_chunked_req is b  # b is the one partial chunk
    assert c.extend_len == 50

    # the same queue through SGLang's stock adder admits differently (FCFS, 256-token chunk)
    alloc, cache2 = kv_and_cache()
    stock = PrefillAdder(*adder_args(alloc, cache2))
    a2, b2, c2 = make_req(100, "a"), make_req(300, "b"), make_req(50, "c")
    got = run_prefill_pass(stock, [a2, b2, c2], cache2)
    assert [r.rid for r in got] == ["a", "b"] and b2.extend_len == 156


def test_plan_token_budget_caps_the_pass():
    b = make_req(300, "b")
    adder, cache = _adder(make_plan(budget=64, prefill={"b": 200}))
    run_prefill_pass(adder, [b], cache)
    assert b.extend_len == 64


def test_mixed_forward_leaves_the_plan_budget_minus_its_decode_rows_to_prefill():
    """--enable-mixed-chunk: SGLang passes the running decoders' tokens; the plan's budget covers both."""
    from sglang_slo.sglang_plugin.prefill_adder import SloPrefillAdder

    alloc, cache = kv_and_cache()
    b = make_req(300, "b")
    adder = SloPrefillAdder.bind(PlanView.of(make_plan(budget=64, prefill={"b": 200})))(
        *adder_args(alloc, cache), 8, max_prefill_bs=0, prefill_max_requests=None)  # 8 decode rows ride along
    run_prefill_pass(adder, [b], cache)
    assert b.extend_len == 64 - 8


def test_no_plan_is_sglang_unchanged():
    adder, cache = _adder(None)
    reqs = [make_req(100, "a"), make_req(300, "b")]
    run_prefill_pass(adder, reqs, cache)
    assert [r.extend_len for r in adder.can_run_list] == [100, 156]


def test_second_partial_chunk_is_refused_while_one_is_open():
    adder, cache = _adder(make_plan(budget=1000, prefill={"old": 40, "n": 30}))
    old = make_req(200, "old")
    old.init_next_round_input(cache)
    old.prefix_len = 0
    still_partial = adder.add_chunked_req(old)
    assert still_partial is old and old.extend_len == 40  # chunk capped at the plan's 40
    n = make_req(100, "n")
    n.init_next_round_input(cache)
    assert adder.add_one_req(n, has_chunked_req=True, truncation_align_size=None) == AddReqResult.OTHER


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lens=st.lists(st.integers(1, 400), min_size=1, max_size=6),
    planned=st.lists(st.integers(1, 400), min_size=1, max_size=6),
    budget=st.integers(1, 800),
)
def test_admission_never_exceeds_plan(lens, planned, budget):
    reqs = [make_req(n, f"p{i}") for i, n in enumerate(lens)]
    plan = make_plan(budget=budget, prefill={r.rid: t for r, t in zip(reqs[::2], planned)})
    adder, cache = _adder(plan)
    from sglang_slo.sglang_plugin.queue_order import order_waiting_queue

    order_waiting_queue(reqs, adder.plan, edf_fallback=False)
    admitted = run_prefill_pass(adder, reqs, cache)
    view = adder.plan
    assert {r.rid for r in admitted} <= set(view.prefill_tokens)
    assert all(r.extend_len <= view.prefill_tokens[r.rid] for r in admitted)
    assert sum(r.extend_len for r in admitted) <= budget
    assert sum(r.extend_len < len(r.origin_input_ids) for r in admitted) <= 1  # one partial chunk at most


# ------------------------------------------------------------------ queue order


def test_calc_priority_hook_orders_by_plan_then_deadline():
    sched = scheduler_shell()
    state = state_for(sched, clock=FakeClock(10.0))
    reqs = {}
    for rid, ttft in (("late", 900), ("soon", 100), ("mid", 400), ("planned", 950)):
        reqs[rid] = make_req(10, rid, slo={"ttft_ms": ttft, "tpot_ms": 50})
        state.on_new_request(reqs[rid])
    _, cache = kv_and_cache()
    policy = SchedulePolicy("fcfs", cache, False, False, False)
    calc = hooked(SchedulePolicy.calc_priority, hooks.order_queue_by_plan, HookType.AROUND)
    queue = list(reqs.values())
    calc(policy, queue, None, processed_tokens=0)
    assert [r.rid for r in queue] == ["late", "soon", "mid", "planned"]  # no plan, no EDF: SGLang's FCFS
    state.edf_fallback = True
    calc(policy, queue, None, processed_tokens=0)
    assert [r.rid for r in queue] == ["soon", "mid", "late", "planned"]
    state.apply_update(PlannerUpdate(plan=make_plan(prefill={"planned": 10})))
    calc(policy, queue, None, processed_tokens=0)
    assert [r.rid for r in queue] == ["planned", "soon", "mid", "late"]


# ------------------------------------------------------------------ shedding


def test_best_effort_and_preempt_decisions_lower_sglang_priority():
    sched = scheduler_shell(enable_priority_scheduling=True)
    state = state_for(sched)
    keep, shed = make_req(10, "keep", priority=5), make_req(10, "shed", priority=5)
    sched.waiting_queue = [keep, shed]
    state.apply_update(PlannerUpdate(plan=make_plan(decisions={"shed": Decision.PREEMPT, "keep": Decision.ADMIT})))
    assert keep.priority == 5 and shed.priority == -sys.maxsize - 1


# ------------------------------------------------------------------ feedback


def test_iteration_report_from_a_real_prefill_batch():
    from types import SimpleNamespace

    from sglang.srt.managers.schedule_batch import ScheduleBatch
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from sglang_slo.sglang_plugin.iteration_report import build_report

    a, b = make_req(30, "a"), make_req(80, "b")
    batch = ScheduleBatch(reqs=[a, b], forward_mode=ForwardMode.EXTEND, extend_lens=[30, 50], prefix_lens=[0, 0])
    batch.launch_ts = 5.0
    a.output_ids.append(7)
    rep = build_report(batch, SimpleNamespace(), step=3, plan_step=2, end_s=5.01, kv_free_tokens=900, waiting=4)
    assert (rep.step, rep.plan_step, rep.prefill_tokens, rep.verify_tokens, rep.waiting) == (3, 2, 80, 0, 4)
    assert [(p.rid, p.prefilled, p.prefill_tokens, p.decoded) for p in rep.progress] == [
        ("a", 30, 30, 1), ("b", 50, 50, 0)]
    batch.forward_mode = ForwardMode.DECODE
    rep = build_report(batch, SimpleNamespace(num_correct_drafts_per_req_cpu=[2, 0]), step=4, plan_step=-1,
                       end_s=6.0, kv_free_tokens=800, waiting=0, spec_depth=3)
    assert rep.verify_tokens == 2 * 4 and rep.draft_steps == 3 and [p.accepted for p in rep.progress] == [2, 0]


def test_iteration_report_of_a_mixed_forward_counts_decode_rows_as_decode():
    from types import SimpleNamespace

    from sglang.srt.managers.schedule_batch import ScheduleBatch
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from sglang_slo.sglang_plugin.iteration_report import build_report

    a, d = make_req(30, "a"), make_req(40, "d")
    d.output_ids.extend([5, 6])  # a running decoder SGLang mixed into a's prefill forward
    batch = ScheduleBatch(reqs=[a, d], forward_mode=ForwardMode.MIXED, extend_lens=[30, 1], prefix_lens=[0, 41],
                          decoding_reqs=[d])
    rep = build_report(batch, SimpleNamespace(), step=1, plan_step=0, end_s=1.0, kv_free_tokens=9, waiting=0)
    assert (rep.prefill_tokens, rep.verify_tokens) == (30, 1)
    assert [(p.rid, p.prefill_tokens) for p in rep.progress] == [("a", 30), ("d", 0)]


def test_reported_free_kv_counts_what_the_prefix_cache_can_evict():
    """A finished request's KV stays in SGLang's radix cache until needed; it is still free to admit."""
    from array import array

    from sglang.srt.mem_cache.base_prefix_cache import InsertParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    from sglang_slo.sglang_plugin.scheduler_state import kv_free_tokens

    alloc, cache = kv_and_cache(1000)
    slots = alloc.alloc(300)  # a finished request's 300 tokens, handed to the cache
    cache.insert(InsertParams(key=RadixKey(array("q", range(300))), value=slots))
    sched = scheduler_shell()
    sched.token_to_kv_pool_allocator, sched.tree_cache = alloc, cache
    assert alloc.available_size() == 700 and cache.evictable_size() == 300
    assert kv_free_tokens(sched) == 1000


# ------------------------------------------------------------------ speculation depth


def test_spec_policy_uses_plan_depth_snapped_to_captured_tiers(tmp_path):
    from sglang_slo.sglang_plugin.spec_policy import SloStepPolicy

    cfg = tmp_path / "tiers.json"
    cfg.write_text(json.dumps({"1": {"candidate_steps": [0, 1, 3, 5]}}))
    view = {"v": None}
    SloStepPolicy.plan_source = staticmethod(lambda: view["v"])
    try:
        policy = SloStepPolicy(initial_steps=3, cfg_path=str(cfg))
        assert policy.candidate_steps == [0, 1, 3, 5]
        assert policy.get_steps_for_batch(4) == 3  # no plan: SGLang's EMA slot (starts at 3)
        view["v"] = PlanView.of(make_plan(spec_depth=4))
        assert policy.get_steps_for_batch(4) == 3  # 4 is not captured: deepest tier below
        view["v"] = PlanView.of(make_plan(spec_depth=0))
        assert policy.get_steps_for_batch(4) == 0
        assert policy.on_verify_complete([3, 3, 3, 3], 4) is None  # the plan rules, EMA never switches
    finally:
        SloStepPolicy.plan_source = staticmethod(lambda: None)


# ------------------------------------------------------------------ entry point


def test_entry_point_dist_info_is_discoverable(tmp_path):
    from importlib.metadata import distributions

    from sglang_slo.sglang_plugin.entry_point import GROUP, VALUE, write_entry_point

    write_entry_point(tmp_path)
    eps = [ep for d in distributions(path=[str(tmp_path)]) for ep in d.entry_points if ep.group == GROUP]
    assert [(ep.name, ep.value) for ep in eps] == [("slo", VALUE)]
    assert eps[0].load().__module__ == "sglang_slo.sglang_plugin"


def test_tp_ranks_stamp_arrivals_with_rank0_clock():
    """With TP > 1 every rank must order the queue identically: arrivals use rank 0's broadcast clock."""
    leader, follower = scheduler_shell(), scheduler_shell()
    leader.token_to_kv_pool_allocator = kv_and_cache()[0]
    s0 = state_for(leader, clock=FakeClock(100.0), endpoint=ipc_endpoint("tp-test"))
    s1 = state_for(follower, clock=FakeClock(250.0))  # another process, another clock reading
    s0._tp_size = s1._tp_size = 2
    out = s0.poll()
    tick = [u for u in out if isinstance(u, PlannerUpdate)]
    assert tick and tick[0].now_s == 100.0
    for st_, sched in ((s0, leader), (s1, follower)):
        for update in pickle.loads(pickle.dumps(tick)):
            st_.apply_update(update)
    a0, a1 = make_req(5, "same", slo={"ttft_ms": 100, "tpot_ms": 10}), make_req(5, "same", slo={"ttft_ms": 100, "tpot_ms": 10})
    s0.on_new_request(a0)
    s1.on_new_request(a1)
    assert a0.slo.arrival_s == a1.slo.arrival_s == 100.0
    s0.link.close()


# ------------------------------------------------------------------ arrivals the plan does not know


def test_arrival_allowance_prefills_an_unplanned_arrival_once_and_only_whole():
    """A plan with `arrival_tokens` lets a request it does not know (arrived after it was made)
    prefill at once, whole, instead of waiting out the plan pipeline; the first prefill forward
    under the plan uses the allowance up; without it (or for a request the plan knows but did
    not admit) the plan's decode choice stands."""
    from sglang.srt.managers.schedule_batch import ScheduleBatch

    sched = scheduler_shell()
    state = state_for(sched)
    defer = hooked(Scheduler._should_defer_prefill, hooks.defer_prefill_by_plan, HookType.AROUND)
    running = ScheduleBatch(reqs=[make_req(8, "d")])
    new = make_req(30, "new")
    sched.waiting_queue = [new]
    state.apply_update(PlannerUpdate(plan=make_plan(prefill={}, decode=["d"])))
    assert defer(sched, running) is True  # no allowance: wait for a plan that knows it
    state.apply_update(PlannerUpdate(plan=make_plan(step=2, prefill={}, decode=["d"], arrival_tokens=64)))
    assert defer(sched, running) is False  # allowance: prefill now
    factory = hooked(Scheduler.get_prefill_adder_class, hooks.plan_prefill_adder, HookType.AROUND)(sched)
    alloc, cache = kv_and_cache()
    adder = factory(*adder_args(alloc, cache), max_prefill_bs=0, prefill_max_requests=None)
    too_big = make_req(100, "big")
    got = run_prefill_pass(adder, [new, too_big], cache)
    assert [r.rid for r in got] == ["new"] and new.extend_len == 30  # whole; 100 > 64 - 30 left: not cut
    state.after_launch(_Launched([new]))
    assert state.plan.view.arrival_tokens == 0 and state.plan.arrivals_admitted == 1
    sched.waiting_queue = [too_big]
    assert defer(sched, running) is True  # one prefill forward per allowance
    # a request the plan knows (in its order) is not an arrival
    state.apply_update(PlannerUpdate(plan=make_plan(step=3, prefill={}, decode=["d", "big"], arrival_tokens=500)))
    assert defer(sched, running) is True


def test_prefill_under_a_plan_uses_its_arrival_allowance_up():
    """The planned chunk's forward is the one forward the allowance was priced for."""
    ps = PlanState()
    ps.apply(PlannerUpdate(plan=make_plan(prefill={"a": 10}, arrival_tokens=40)))
    assert ps.view.arrival_tokens == 40 and ps.view.admits_arrival("x") and not ps.view.admits_arrival("a")
    ps.consume(["a"])
    assert ps.view.arrival_tokens == 0 and ps.arrivals_admitted == 0 and not ps.view.admits_arrival("x")


def test_hello_says_whether_prefill_and_decode_share_a_forward():
    sched = scheduler_shell()
    state = state_for(sched)
    sched.is_mixed_chunk = False
    assert state._hello(1.0).mixed_forward is False
    sched.is_mixed_chunk = True
    assert state._hello(1.0).mixed_forward is True
