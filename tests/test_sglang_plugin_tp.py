"""The plugin's TP > 1 path without SGLang: two ranks' `SloSchedulerState`s fed the same
broadcast (rank 0's `poll()` output, pickled as SGLang's `broadcast_pyobj` does) must stamp
identical SLO deadlines, with or without a planner, even though each rank reads its own clock
at a different moment. The real two-process run is tests/test_sglang_tp2_cpu.py."""

from __future__ import annotations

import itertools
import pickle
from types import SimpleNamespace

import pytest

from sglang_slo.sglang_plugin.plan_state import PlannerUpdate
from sglang_slo.sglang_plugin.scheduler_state import SloSchedulerState


class _Clock:
    """A rank-local clock: every read is later than the previous one (ranks never read the same value)."""

    def __init__(self, start: float, step: float):
        self._ticks = itertools.count()
        self.start, self.step = start, step

    def __call__(self) -> float:
        return self.start + next(self._ticks) * self.step


def _rank(clock, tp_size=2) -> SloSchedulerState:
    sched = SimpleNamespace(enable_priority_scheduling=False)
    state = SloSchedulerState(sched, endpoint=None, clock=clock)
    state._tp_size = tp_size
    state._is_leader = clock.start == 100.0
    return state


def _req(rid: str, slo: dict):
    return SimpleNamespace(rid=rid, priority=None, sampling_params=SimpleNamespace(custom_params={"slo": slo}),
                           set_finish_with_abort=lambda *a, **k: (_ for _ in ()).throw(AssertionError(a)))


def _dispatch(state: SloSchedulerState, broadcast: bytes, new_reqs: list) -> None:
    """What every rank's loop pass does: the pulled requests first, then rank 0's local list."""
    for req in new_reqs:
        state.on_new_request(req)
    for obj in pickle.loads(broadcast):
        if isinstance(obj, PlannerUpdate):
            state.apply_update(obj)


def test_tp_ranks_stamp_identical_deadlines_without_a_planner():
    """Each request is anchored on rank 0's clock of the pass that received it (read by
    `poll()` right before SGLang pulls the requests), on every rank, from the first pass on."""
    rank0, rank1 = _rank(_Clock(100.0, 0.003)), _rank(_Clock(100.0021, 0.0007))
    slos = [{"ttft_ms": 500, "tpot_ms": 50}, {"ttft_ms": 499.9, "tpot_ms": 50}, {"class": "chat"}]
    stamps = {0: {}, 1: {}}
    pass_clock = {}
    for n in range(4):  # loop passes; pass n receives request n (none in pass 3)
        out = rank0.poll()  # rank 0 only, before the pull (SGLang's _poll_timeout_aborts)
        assert [type(o) for o in out] == [PlannerUpdate] and out[0].now_s is not None
        wire = pickle.dumps(out)
        for r, state in ((0, rank0), (1, rank1)):
            reqs = [_req(f"r{n}", slos[n])] if n < len(slos) else []
            _dispatch(state, wire, reqs)
            for req in reqs:
                pass_clock[req.rid] = out[0].now_s
                stamps[r][req.rid] = req
    for r in (0, 1):
        stamps[r] = {rid: (req.slo.arrival_s, req.slo.ttft_deadline_s) for rid, req in stamps[r].items()}
    assert stamps[0] == stamps[1]
    assert {rid: a for rid, (a, _) in stamps[0].items()} == pass_clock
    assert rank0._unanchored == [] and rank1._unanchored == []


def test_single_rank_without_a_planner_broadcasts_nothing():
    state = _rank(_Clock(100.0, 0.001), tp_size=1)
    assert state.poll() == []
    req = _req("a", {"ttft_ms": 100})
    state.on_new_request(req)
    assert req.slo.arrival_s > 100.0  # its own clock


def test_tp_arrivals_anchor_on_the_clock_that_rides_with_a_plan():
    from protos.messages import Plan

    rank1 = _rank(_Clock(500.0, 0.001))
    rank1.apply_update(PlannerUpdate(now_s=10.0))  # the previous pass
    req = _req("a", {"ttft_ms": 300})
    rank1.on_new_request(req)
    assert req.slo.arrival_s == 10.0  # provisional: the last clock seen
    rank1.apply_update(PlannerUpdate(plan=Plan(step=3, valid_until_s=11.0, token_budget=64), now_s=10.05))
    assert req.slo.arrival_s == 10.05 and req.slo.ttft_deadline_s == pytest.approx(10.35)
    assert rank1.plan.step == 3
    rank1.apply_update(PlannerUpdate(now_s=10.2))  # later passes leave it alone
    assert req.slo.arrival_s == 10.05
