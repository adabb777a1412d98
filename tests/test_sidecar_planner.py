"""Planner driven by protocol messages (no sockets): hello, arrivals, reports, finishes,
resync, pipelined step numbering and in-flight projection, unknown rids, stamping."""

from __future__ import annotations

from pathlib import Path

import pytest

from protos import messages as m
from sidecar.planner import Planner
from sidecar.policies.base import make_policy, register_policy
from sidecar.policies.fcfs import FcfsPolicy

D = m.Decision
HW = Path(__file__).resolve().parent.parent / "configs" / "hardware" / "h100-llama3.1-8b-eagle3.yaml"


def hello(**kw) -> m.EngineHello:
    args = dict(protocol_version=m.PROTOCOL_VERSION, engine="sim", spec_modes=[m.SpecMode.CHAIN],
                max_batch_tokens=1024, kv_capacity_tokens=100_000, max_depth=6, max_width=1)
    args.update(kw)
    return m.EngineHello(**args)


def arrived(rid: str, prompt=1000, max_new=100, t=0.0, cls="chat", **slo) -> m.RequestArrived:
    return m.RequestArrived(rid, prompt, max_new, m.Slo(slo.get("ttft", 1.0), slo.get("tpot", 0.05), slo_class=cls), t)


def report(step: int, t: float, progress=(), kv_free=90_000, **kw) -> m.IterationReport:
    return m.IterationReport(step, t - 0.02, t, kw.get("plan_step", step), kw.get("prefill", 0), kw.get("verify", len(progress)),
                             kw.get("draft_steps", 0), kw.get("ctx", 0), kv_free, list(progress))


@pytest.fixture
def planner() -> Planner:
    p = Planner.create("fcfs", HW, chunk_size=512, spec_k=2)
    p.observe(hello())
    return p


def test_hello_sets_limits_from_the_engine(planner):
    assert planner.state.limits.max_batch_tokens == 1024
    assert planner.state.limits.kv_capacity_tokens == 100_000
    assert planner.state.spec_enabled
    assert planner.profile.engine.max_batch_tokens == 8192  # the profile's guess stays as it was


def test_request_life_cycle(planner):
    planner.observe(arrived("a", prompt=700))
    plan = planner.plan(0.01)
    assert plan.step == 1 and plan.based_on_step == -1
    assert [(d.rid, d.decision) for d in plan.decisions] == [("a", D.ADMIT)]
    assert [(c.rid, c.tokens) for c in plan.prefill] == [("a", 512)]
    assert plan.valid_until_s > 0.01 and plan.plan_latency_s > 0
    # Engine ran plan 1 at step 1 and reports it; the planner plans step 3.
    planner.observe(report(1, 0.05, [m.RequestProgress("a", 512, 0, prefill_tokens=512)], prefill=512))
    plan = planner.plan(0.05)
    assert plan.step == 3 and plan.based_on_step == 1
    assert [(c.rid, c.tokens) for c in plan.prefill] == [("a", 188)]
    planner.observe(report(2, 0.08, [m.RequestProgress("a", 700, 1, prefill_tokens=188, first_token_s=0.08)]))
    plan = planner.plan(0.08)
    # Plan 3 (in flight) had a's last chunk; the report already shows it done.
    assert plan.prefill == [] and [(e.rid, e.depth, e.tree_cap) for e in plan.decode] == [("a", 2, 3)]
    assert planner.state.requests["a"].first_token_s == 0.08
    planner.observe(m.RequestFinished("a", m.FinishReason.STOP, 40, 0.5))
    assert "a" not in planner.state.requests
    assert planner.plan(0.5).decode == []


def test_pipelined_plans_do_not_schedule_a_chunk_twice(planner):
    planner.observe(arrived("a", prompt=2000))
    planner.observe(report(0, 0.01))
    p2 = planner.plan(0.01)  # for step 2, engine runs step 1 meanwhile
    assert [(c.rid, c.tokens) for c in p2.prefill] == [("a", 512)]
    planner.observe(report(1, 0.03, plan_step=-1))  # step 1 ran without a's chunk
    p3 = planner.plan(0.03)
    assert p3.step == 3
    # p2's chunk is in flight: p3 takes the next 512 tokens, and the KV estimate knows it.
    assert [(c.rid, c.tokens) for c in p3.prefill] == [("a", 512)]
    assert planner.state.requests["a"].prefilled == 512
    assert planner.state.kv_free_tokens == 90_000 - 512
    # The report of step 2 states the facts; projection from p3 applies on top.
    planner.observe(report(2, 0.05, [m.RequestProgress("a", 512, 0, prefill_tokens=512)]))
    assert planner.state.requests["a"].prefilled == 1024


def test_a_planned_chunk_that_never_ran_stops_counting_once_its_step_is_reported(planner):
    planner.observe(arrived("a", prompt=2000))
    planner.observe(report(0, 0.01))
    planner.plan(0.01)  # step 2: a's first 512
    planner.observe(report(1, 0.03, plan_step=-1))
    p3 = planner.plan(0.03)  # step 3: a's next 512, on top of the projected first chunk
    assert [(c.rid, c.tokens) for c in p3.prefill] == [("a", 512)]
    # Step 2 ran without a (KV was full): only plan 3's chunk is still projected, once.
    planner.observe(report(2, 0.05, kv_free=0))
    assert planner.state.requests["a"].prefilled == 512
    planner.observe(report(3, 0.07, kv_free=0))
    assert planner.state.requests["a"].prefilled == 0
    assert [(c.rid, c.tokens) for c in planner.plan(0.07).prefill] in ([], [("a", 512)])


def test_unknown_rids_are_skipped_not_fatal(planner, caplog):
    planner.observe(report(0, 0.01, [m.RequestProgress("ghost", 10, 1)]))
    planner.observe(m.RequestFinished("ghost2", m.FinishReason.ABORT, 0, 0.02))
    assert planner.skipped_unknown == 2
    assert "ghost" in caplog.text
    assert planner.state.step == 0
    planner.plan(0.02)


def test_duplicate_arrival_is_ignored(planner):
    planner.observe(arrived("a", prompt=10))
    planner.state.requests["a"].prefilled = 5
    planner.observe(arrived("a", prompt=999))
    assert planner.state.requests["a"].prompt_tokens == 10 and planner.state.requests["a"].prefilled == 5


def test_engine_started_requests_count_as_admitted(planner):
    planner.observe(arrived("a", prompt=100))
    planner.observe(report(0, 0.01, [m.RequestProgress("a", 100, 1)]))  # engine's fallback ran it
    plan = planner.plan(0.01)
    assert plan.decisions == [] and [e.rid for e in plan.decode] == ["a"]


def test_reports_feed_the_acceptance_and_cost_models(planner):
    planner.observe(arrived("a", prompt=10, cls="coding"))
    a0 = planner.acceptance.alphas("a", 1)[0]
    for i in range(30):
        planner.observe(report(i, 0.1 * (i + 1), [m.RequestProgress("a", 10, i + 1, verified=4, accepted=0, depth=4)],
                               verify=5, draft_steps=4, ctx=50))
    assert planner.acceptance.alphas("a", 1)[0] < a0 - 0.2
    # 100 ms iterations against a ~7 ms prediction: the scale moves up (clipped per step).
    assert planner.cost.scale > 2.0


def test_deferred_upkeep_learns_verifies_after_the_plan_and_before_a_finish(planner):
    """The sidecar plans first and learns after sending: outcomes wait for upkeep(), at most
    one report; a finishing request's outcomes reach the class before its estimate goes."""
    planner.defer_upkeep = True
    planner.observe(arrived("a", prompt=10, cls="coding"))
    a0 = planner.acceptance.alphas("a", 1)[0]
    miss = [m.RequestProgress("a", 10, 2, verified=4, accepted=0, depth=4)]
    planner.observe(report(0, 0.1, miss, verify=5, draft_steps=4, ctx=50))
    assert planner.acceptance.alphas("a", 1)[0] == a0  # not yet: the plan goes out first
    planner.plan(0.1)
    planner.upkeep()
    a1 = planner.acceptance.alphas("a", 1)[0]
    assert a1 < a0
    planner.observe(report(1, 0.2, miss, verify=5, draft_steps=4, ctx=50))
    planner.observe(report(2, 0.3, miss, verify=5, draft_steps=4, ctx=50))  # no upkeep between
    assert a1 > planner.acceptance.alphas("a", 1)[0]  # the older report was learned first
    learned = planner.acceptance._class_updates  # verify outcomes per class
    assert learned["coding"] == 2  # report 2's outcome still waits
    planner.observe(m.RequestFinished("a", m.FinishReason.LENGTH, 2, 0.35))
    assert learned["coding"] == 3
    planner.upkeep()
    assert "a" not in planner.acceptance._requests  # no estimate re-created after forget


def test_resync_replaces_state(planner):
    planner.observe(arrived("old", prompt=10))
    snap = m.RequestSnapshot(arrived("x", prompt=300, t=1.0), prefilled=300, decoded=7, first_token_s=1.2, decision=D.ADMIT)
    waiting = m.RequestSnapshot(arrived("y", prompt=50, t=1.1))
    planner.observe(m.Resync(now_s=2.0, step=41, requests=[snap, waiting], kv_free_tokens=5000))
    st = planner.state
    assert list(st.requests) == ["x", "y"] and st.step == 41 and st.kv_free_tokens == 5000
    assert st.requests["x"].is_decoding and st.requests["x"].decoded == 7
    assert st.limits.max_batch_tokens == 1024  # limits survive a resync
    plan = planner.plan(2.0)  # fcfs, prefill first: y's prompt runs, x waits
    assert plan.step == 43 and plan.decode == [] and [(c.rid, c.tokens) for c in plan.prefill] == [("y", 50)]
    assert [(d.rid, d.decision) for d in plan.decisions] == [("y", D.ADMIT)]


def test_valid_until_covers_a_few_predicted_iterations(planner):
    planner.observe(arrived("a", prompt=10))
    planner.observe(report(0, 1.0, [m.RequestProgress("a", 10, 1)]))
    plan = planner.plan(1.0)
    t_iter = planner.cost.iteration_time(0, 3, 2, 0, 2)  # context from the last report (0)
    assert plan.valid_until_s == pytest.approx(1.0 + max(0.005, 4 * t_iter))


def test_policy_defaults_from_profile_and_overrides():
    p = Planner.create("fcfs", HW)
    assert p.policy.config.chunk_size == 8192 and p.policy.config.spec_k == 3
    p = Planner.create("fcfs", HW, spec_k=0)
    assert p.policy.config.spec_k == 0 and p.policy.config.chunk_size == 8192


def test_register_policy_and_missing_module_errors():
    register_policy("fcfs_k1", lambda **kw: FcfsPolicy())
    assert isinstance(make_policy("fcfs_k1"), FcfsPolicy)
    with pytest.raises(ValueError, match="unknown policy"):
        Planner.create("does-not-exist", HW)


class _BrokenPolicy(FcfsPolicy):
    """Breaks every rule of the contract."""

    name = "broken"

    def plan(self, ctx):
        rids = list(ctx.state.requests)
        return m.Plan(
            step=0, valid_until_s=0.0, token_budget=1,
            prefill=[m.PrefillChunk("ghost", 5), m.PrefillChunk(rids[1], 10_000), m.PrefillChunk(rids[2], 3)],
            decode=[m.DecodeEntry(rids[1]), m.DecodeEntry(rids[0], tree_cap=0), m.DecodeEntry(rids[0])],
            decisions=[m.AdmissionDecision(rids[0], D.REJECT), m.AdmissionDecision(rids[1], D.ADMIT)],
        )


def test_plans_that_break_the_contract_are_repaired(planner):
    register_policy("broken", lambda **kw: _BrokenPolicy())
    p = Planner.create("broken", HW)
    p.observe(hello())
    for rid, prompt in (("run", 10), ("new", 100), ("wait", 50)):
        p.observe(arrived(rid, prompt=prompt))
    p.observe(report(0, 0.1, [m.RequestProgress("run", 10, 3)]))
    plan = p.plan(0.1)
    assert p.contract_fixes == 2  # the decisions, then the rest
    assert [(d.rid, d.decision) for d in plan.decisions] == [("new", D.ADMIT)]  # REJECT of a running one dropped
    assert p.state.requests["run"].is_decoding
    assert [(e.rid, e.tree_cap) for e in plan.decode] == [("run", 1)]
    assert sum(c.tokens for c in plan.prefill) + len(plan.decode) <= plan.token_budget
    assert plan.token_budget == 1 and plan.prefill == []  # ghost, not-admitted and over-budget chunks dropped


def test_lazy_policy_module_missing_is_named(monkeypatch):
    from sidecar.policies import base

    monkeypatch.setitem(base._LAZY, "future_policy", "sidecar.policies.future_policy")
    with pytest.raises(ValueError, match="module sidecar.policies.future_policy does not exist yet"):
        make_policy("future_policy")


def _rep(step: int, start: float, end: float, plan_step: int) -> m.IterationReport:
    return m.IterationReport(step, start, end, plan_step, 0, 1, 0, 0, 90_000, [m.RequestProgress("a", 10, 1)])


def test_adaptive_horizon_covers_the_measured_plan_lag(planner):
    """How old the newest plan was when a busy engine started an iteration (applied, or fallen
    back because it had expired) stretches later plans' validity; idle gaps don't count."""
    assert not planner.adaptive_horizon  # in-process (simulator) planning: fixed horizon
    planner.adaptive_horizon, planner.max_horizon_s = True, 1.0
    planner.observe(arrived("a", prompt=10))
    planner.observe(_rep(0, 0.9, 1.0, -1))  # first report: nothing to compare with
    base = planner.plan(1.0, step=2).valid_until_s - 1.0
    assert planner.plan_lag_s == 0.0 and base < 0.25
    planner.observe(_rep(1, 1.0, 1.1, -1))  # fell back, but plan 2 was made at its start: age 0
    planner.observe(_rep(2, 1.1, 1.2, 2))  # plan 2 applied 0.1 s after it was made
    assert planner.plan_lag_s == pytest.approx(0.1)
    planner.observe(_rep(3, 1.2, 1.5, -1))  # busy, no valid plan: the newest (made at 1.0) was 0.2 s old
    assert planner.plan_lag_s == pytest.approx(0.2)
    plan = planner.plan(1.5, step=5)
    assert plan.valid_until_s == pytest.approx(1.5 + 1.25 * 0.2)
    planner.observe(_rep(4, 3.0, 3.1, 5))  # after an idle gap: plan 5's age is no lag
    assert planner.plan_lag_s == pytest.approx(0.2)
    planner.plan(3.1, step=6)
    planner.observe(_rep(5, 3.1, 3.2, 6))  # fresh plan: the spike decays (half per second)
    assert planner.plan_lag_s == pytest.approx(0.2 * 0.5 ** (3.1 - 1.2))
    planner.adaptive_horizon = False
    fixed = planner.plan(3.2, step=7).valid_until_s - 3.2  # 4 predicted iterations
    planner.adaptive_horizon, planner.plan_lag_s = True, 5.0
    assert planner.plan(3.2, step=7).valid_until_s - 3.2 == pytest.approx(1.0)  # capped at max_horizon_s
    planner.max_horizon_s = fixed / 2  # the cap bounds the adaptive part only
    assert planner.plan(3.2, step=7).valid_until_s - 3.2 == pytest.approx(fixed)


def test_fixed_horizon_ignores_plan_lag(planner):
    planner.observe(arrived("a", prompt=10))
    planner.observe(_rep(0, 0.9, 1.0, -1))
    before = planner.plan(1.0, step=2).valid_until_s - 1.0
    planner.observe(_rep(1, 1.0, 1.5, -1))
    planner.observe(_rep(2, 1.5, 2.0, 2))  # applied 0.5 s late: not measured with adaptation off
    assert planner.plan_lag_s == 0.0
    assert planner.plan(2.0, step=4).valid_until_s - 2.0 < 0.25 and before < 0.25


def test_a_plan_applied_a_step_late_keeps_its_chunk_projected(planner):
    """SGLang on CPU runs plan k + 2 in step k + 3 (its reply arrives during k + 2): the
    report of step k + 2 says it ran plan k + 1, so plan k + 2's chunk is still coming and
    the next plan must not schedule the same tokens again. Without plans_apply_late it is
    rolled back at that report (the simulator's schedule: plan k + 2 runs in step k + 2)."""
    def run(late: bool) -> list:
        p = Planner.create("fcfs", HW, chunk_size=512, spec_k=2)
        p.observe(hello())
        p.plans_apply_late = late
        p.observe(arrived("a", prompt=2000))
        p.observe(report(0, 0.01, plan_step=-1))
        assert [(c.rid, c.tokens) for c in p.plan(0.01).prefill] == [("a", 512)]  # plan 2
        p.observe(report(1, 0.03, plan_step=-1))
        p.plan(0.03)  # plan 3: a's next 512, on top of plan 2's chunk
        p.observe(report(2, 0.05, plan_step=1))  # step 2 ran an older plan; plan 2 runs in step 3
        return [p.state.requests["a"].prefilled, [(c.rid, c.tokens) for c in p.plan(0.05).prefill]]

    assert run(late=True) == [1024, [("a", 512)]]  # plans 2 and 3 in flight: plan 4 takes tokens 1024-1535
    assert run(late=False) == [512, [("a", 512)]]  # only plan 3 counts: plan 4 re-plans tokens 512-1023
    p = Planner.create("fcfs", HW)
    p.observe(hello())
    p.plans_apply_late = True
    p.observe(report(5, 0.01, plan_step=5))  # applied on time: plan 5 is reported, nothing kept
    assert p._projection_floor(report(6, 0.02, plan_step=6)) == 6
    assert p._projection_floor(report(7, 0.03, plan_step=-1)) == 6  # fallback step: plan 7 may still run
