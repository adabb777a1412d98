"""slo_unified on an engine that cannot mix prefill and decode in one forward (SGLang without
--enable-mixed-chunk): prompts whole and together, timed by whether waiting saves a decoder;
arrivals the plan does not know may prefill at once while the decoders absorb it."""

from __future__ import annotations

import math
import random

import numpy as np

from protos import messages as protos
from sidecar.acceptance import AcceptanceModel
from sidecar.cost_model import load_profile
from sidecar.planner import Planner
from sidecar.policies import prefill_only
from sidecar.policies.base import PlanContext, make_policy
from sidecar.state import PlannerState
from test_policies_factories import ROOT, check_plan_invariants, make_ctx, make_state

CPU = load_profile(ROOT / "tests/sglang_support/hardware-cpu-tiny-sglang.yaml")
T_DEC = 0.003


def _state(decoders: list[tuple[float, int]], prompts: list[tuple[str, int, float]], now: float = 10.0,
           mixed: bool = False) -> PlannerState:
    """decoders: (seconds of SLOs-Serve slack of the next token, output tokens left), TPOT
    3.6 ms; prompts: (rid, tokens, TTFT seconds) arriving now, not yet admitted."""
    st = PlannerState(limits=CPU.engine, mixed_forward=mixed)
    st.now_s = now
    for i, (slack, left) in enumerate(decoders):
        slo = protos.Slo(0.09, 0.0036, slo_class="coding")
        # first token at the TTFT deadline (no bank): next token due at t0 + decoded * tpot
        decoded = 5
        t0 = now + slack - decoded * 0.0036
        r = st.add(protos.RequestArrived(f"d{i}", 40, decoded + left, slo, t0 - 0.09))
        r.prefilled, r.decoded, r.first_token_s, r.decision = 40, decoded, t0, protos.Decision.ADMIT
    for rid, n, ttft in prompts:
        st.add(protos.RequestArrived(rid, n, 40, protos.Slo(ttft, 0.009, slo_class="chat"), now))
    return st


def _plan(st: PlannerState, **overrides) -> protos.Plan:
    policy = make_policy("slo_unified", decode_gate=False, **overrides)
    plan = policy.plan(PlanContext(st, CPU.cost, AcceptanceModel(CPU.acceptance_priors), st.now_s, step=1))
    check_plan_invariants(st, plan)
    return plan


def test_waiting_prompts_go_whole_in_one_forward_when_decoders_have_slack():
    st = _state([(0.2, 40)], [("a", 37, 0.15), ("b", 50, 0.15), ("c", 21, 0.15)])
    plan = _plan(st)
    assert sorted((c.rid, c.tokens) for c in plan.prefill) == [("a", 37), ("b", 50), ("c", 21)]
    assert plan.arrival_tokens > 0  # the decoders absorb more: a later arrival may join at once


def test_no_decoders_and_nothing_waiting_admits_arrivals_like_sglang():
    st = _state([], [])
    plan = _plan(st)
    assert plan.prefill == [] and plan.arrival_tokens == CPU.engine.max_batch_tokens


def test_a_mixing_engine_gets_the_unused_prefill_room_as_arrival_allowance():
    """EngineHello's default (mixed_forward True): the same chunks as before this feature; the
    allowance is what the plan's prefill room leaves, and nothing while a known request waits."""
    for seed in range(5):
        st = make_state(random.Random(seed), 20, 3, 6)
        assert st.mixed_forward
        plan = make_policy("slo_unified").plan(make_ctx(st))
        assert plan.arrival_tokens == 0  # six requests wait: they go first
    st = _state([(0.2, 40)], [("a", 37, 0.15)], mixed=True)
    plan = _plan(st)
    assert [(c.rid, c.tokens) for c in plan.prefill] == [("a", 37)] and plan.arrival_tokens > 0
    assert 37 + plan.arrival_tokens + len(plan.decode) <= CPU.engine.max_batch_tokens


def test_prompt_waits_only_while_waiting_saves_a_decoder():
    """A decoder 2 ms from its next deadline (a prefill forward + its decode take ~10 ms)."""
    t_fwd = prefill_only.prefill_seconds(CPU.cost, 37)
    # it finishes within the prompt's spare TTFT (3 tokens): the prompt waits, no allowance
    st = _state([(0.0125, 3)], [("a", 37, 0.15)])
    assert 0.0125 < t_fwd + CPU.cost.iteration_time(0, 1, 0, 45)
    plan = _plan(st)
    assert plan.prefill == [] and plan.arrival_tokens == 0
    # it has 500 tokens left at a TPOT it cannot beat: waiting saves no one, the prompt goes now
    st = _state([(0.0125, 500)], [("a", 37, 0.15)])
    plan = _plan(st)
    assert [(c.rid, c.tokens) for c in plan.prefill] == [("a", 37)]
    # the same decoder that would finish, but the prompt's TTFT leaves it no time to wait
    st = _state([(0.0125, 3)], [("a", 37, 0.02)])
    assert [c.rid for c in _plan(st).prefill] == ["a"]


def test_decoders_saved_by_waiting_banks_or_finishes():
    dec = prefill_only.Decoders(hard=np.array([0.004, 0.05]), tpot=np.array([0.0036, 0.0036]),
                                left=np.array([100, 100]), t_dec=T_DEC)
    assert math.isclose(dec.allowance(), 0.001)
    # the first banks 0.6 ms per 3 ms iteration: a 6 ms forward needs 5 ms more slack -> 25 ms
    assert not dec.saved_by_waiting(0.006, 0.02)
    assert dec.saved_by_waiting(0.006, 0.026)
    # already behind (slack below one decode): never "endangered", never waited for
    behind = prefill_only.Decoders(np.array([0.001]), np.array([0.0036]), np.array([2]), T_DEC)
    assert behind.allowance() == math.inf and not behind.saved_by_waiting(0.1, 10.0)
    # finishes: 3 tokens x 3 ms within a 10 ms wait
    fin = prefill_only.Decoders(np.array([0.004]), np.array([0.003]), np.array([3]), T_DEC)
    assert fin.saved_by_waiting(0.006, 0.01) and not fin.saved_by_waiting(0.006, 0.008)


def test_prefill_within_is_the_largest_fitting_forward():
    assert prefill_only.prefill_within(CPU.cost, 0.9 * CPU.cost.base_s, 4096) == 0  # not even one token
    for seconds in (0.008, 0.012, 0.03):
        n = prefill_only.prefill_within(CPU.cost, seconds, 4096)
        assert prefill_only.prefill_seconds(CPU.cost, n) <= seconds < prefill_only.prefill_seconds(CPU.cost, n + 1)
    assert prefill_only.prefill_within(CPU.cost, math.inf, 4096) == 4096


def test_best_effort_prompt_is_not_starved_when_waiting_saves_no_one():
    # a long decoder at a TPOT no faster than its iterations: waiting banks nothing
    dec = prefill_only.Decoders(np.array([0.004]), np.array([T_DEC]), np.array([1000]), T_DEC)
    assert prefill_only.best_effort_room(CPU.cost, 4096, [30, 30], 0, dec, 0.15) == 30
    ends = prefill_only.Decoders(np.array([0.004]), np.array([0.0036]), np.array([3]), T_DEC)
    assert prefill_only.best_effort_room(CPU.cost, 4096, [30, 30], 0, ends, 0.15) == 0


def test_planner_takes_mixed_forward_from_the_hello_and_keeps_it_over_a_resync():
    planner = Planner.create("slo_unified", ROOT / "tests/sglang_support/hardware-cpu-tiny-sglang.yaml")
    assert planner.state.mixed_forward
    planner.observe(protos.EngineHello(protos.PROTOCOL_VERSION, "sglang", [protos.SpecMode.NONE], 4096, 16384,
                                       mixed_forward=False))
    assert planner.state.mixed_forward is False
    planner.observe(protos.Resync(1.0, 3))
    assert planner.state.mixed_forward is False
    plan = planner.plan(1.0)
    assert plan.arrival_tokens == 4096  # idle no-mix engine: arrivals prefill at once
