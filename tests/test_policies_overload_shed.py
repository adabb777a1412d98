"""Overload shedding (sidecar/policies/overload_shed.py) and its use in slo_unified."""

from __future__ import annotations

import math
import random

import pytest

from protos import messages as protos
from sidecar.acceptance import AcceptanceModel
from sidecar.policies.base import make_policy
from sidecar.policies.overload_shed import (
    DecayedBins, OutputLifeTable, OverloadShed, ShedConfig, cost_bin, fill_position,
)
from sidecar.steady_cost import DecodeItem, decode_cost_per_token, prefill_seconds
from test_policies_factories import CLASSES, H100, check_plan_invariants, make_ctx, make_state

COST = H100.cost
ACC = AcceptanceModel(H100.acceptance_priors)
DEPTH = H100.engine.max_depth
Decision = protos.Decision
# cheap: a short coding call; dear: a reasoning call (long output); both on the same profile
CHEAP = dict(prompt=200, max_new=256, slo=CLASSES["coding"])
DEAR = dict(prompt=200, max_new=4096, slo=CLASSES["reasoning"])


def _arrivals(rng: random.Random, rate: float, t0: float, t1: float, kinds: list[tuple[dict, float]],
              start: int = 0, session_share: float = 0.0):
    """Poisson arrivals of the kinds (weights) in [t0, t1) as RequestArrived messages."""
    out, t, i = [], t0, start
    total = sum(w for _, w in kinds)
    while True:
        t += rng.expovariate(rate)
        if t >= t1:
            return out
        x, acc = rng.random() * total, 0.0
        for kind, w in kinds:
            acc += w
            if x < acc:
                break
        sess = f"s{i}" if rng.random() < session_share else ""
        out.append(protos.RequestArrived(f"q{i}", kind["prompt"], kind["max_new"], kind["slo"], t, session_id=sess))
        i += 1


def _run(shed: OverloadShed, msgs, step_s: float = 0.05) -> dict[str, bool]:
    """Feed arrivals, deciding every step_s (like plans); rid -> passed."""
    passed, t, pending = {}, msgs[0].arrival_s if msgs else 0.0, []
    for m in msgs:
        while m.arrival_s > t + step_s:
            t += step_s
            for rid in shed.decide(COST, ACC, DEPTH, t):
                passed[rid] = False
        shed.arrived(m)
        passed[m.rid] = True
    for rid in shed.decide(COST, ACC, DEPTH, t + step_s):
        passed[rid] = False
    return passed


# ---- the pure parts ---------------------------------------------------------------------------


def test_steady_cost_matches_a_linear_scan_over_batches():
    items = [DecodeItem(ACC.class_alphas(c), out, 500, s.tpot_s, c) for c, s, out in
             [("coding", CLASSES["coding"], 200), ("chat", CLASSES["chat"], 200), ("reasoning", CLASSES["reasoning"], 2000)]]
    per_token, batch = decode_cost_per_token(COST, items, DEPTH)
    assert 0 < per_token < COST.iteration_time(0, 1, 0, 500)  # batching beats one request alone
    k = batch["depth"]
    t = lambda b: COST.iteration_time(0, b * (k + 1), k, 0, b * k, requests=b, spec_requests=b if k else 0)  # noqa: E731
    assert t(batch["batch"]) <= batch["iteration_ms"] / 1e3 + 1e-9  # context only adds time
    assert prefill_seconds(COST, 0) == 0 and prefill_seconds(COST, 2000) > 2 * prefill_seconds(COST, 1000) * 0.99


def test_fill_position_admits_cheapest_first_and_is_monotone():
    rng = random.Random(1)
    for _ in range(300):
        bins = [(rng.randint(0, 80), rng.uniform(0.0, 0.5)) for _ in range(rng.randint(1, 12))]
        merged: dict[int, float] = {}
        for j, x in bins:
            merged[j] = merged.get(j, 0.0) + x
        total = sum(merged.values())
        cap = rng.uniform(0.05, 2.0)
        p = fill_position(bins, cap)
        if total <= cap:
            assert p == math.inf  # no overload: everything admitted
            continue
        j = math.floor(p)
        admitted = sum(x for k, x in merged.items() if k < j) + (p - j) * merged.get(j, 0.0)
        assert admitted == pytest.approx(cap, rel=1e-9)  # fills the capacity exactly, cheapest first
        # monotone: more load (every bin scaled up) never loosens it; more capacity never tightens it
        assert fill_position([(k, 1.5 * x) for k, x in bins], cap) <= p
        assert fill_position(bins, cap * 1.2) >= p


def test_cost_bins_and_decayed_rates():
    assert cost_bin(1e-3) < cost_bin(2e-3) < cost_bin(1.0)
    b = DecayedBins(window_s=10.0)
    for i in range(2000):  # 20 arrivals/s of 0.05 GPU s each for 100 s: load 1.0
        b.add(i * 0.05, cost_bin(0.05), 0.05)
    assert b.total(100.0) == pytest.approx(1.0, rel=0.05)
    b2 = DecayedBins(window_s=10.0)
    for i in range(100):  # a cold start is bias-corrected: 5 s of the same stream reads as load ~1
        b2.add(i * 0.05, 0, 0.05)
    assert b2.total(5.0) == pytest.approx(1.0, rel=0.1)
    b3 = DecayedBins(window_s=15.0)
    for i in range(20):  # but a first burst is not a sustained rate: 20 arrivals in 0.4 s
        b3.add(i * 0.02, 0, 0.05)
    assert b3.total(0.4) < 0.3


def test_output_life_table_is_not_fooled_by_the_short_requests_finishing_first():
    rng = random.Random(2)
    outs = [min(4000, int(rng.lognormvariate(7.3, 0.8))) for _ in range(400)]
    true_mean = sum(outs) / len(outs)
    table = OutputLifeTable(prior_tokens=500, prior_samples=4, memory=1000, cap_tokens=4000)
    t = 600  # every request started at once and decoded t tokens: the short ones are done
    for o in outs:
        if o <= t:
            table.finished(o)
    finished_only = sum(o for o in outs if o <= t) / sum(o <= t for o in outs)
    est = table.mean([t for o in outs if o > t])
    assert finished_only < 0.4 * true_mean  # what a mean of finished requests would say
    assert 0.6 * true_mean < est < 1.6 * true_mean


# ---- the shed over arrival streams --------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_below_overload_every_arrival_passes(seed):
    rng = random.Random(seed)
    shed = OverloadShed(ShedConfig())
    dear_cost = prefill_seconds(COST, 200) + 0.08e-3 * 2048  # ~0.17 GPU s per reasoning call
    rate = rng.uniform(0.3, 0.5) / (0.5 * dear_cost)  # half the arrivals dear: load < 0.6 (+ estimate error)
    msgs = _arrivals(rng, rate, 0.0, 60.0, [(CHEAP, 1.0), (DEAR, 1.0)])
    passed = _run(shed, msgs)
    assert all(passed.values()) and shed.counters["shed"] == 0


@pytest.mark.parametrize("seed", range(4))
def test_above_overload_the_costliest_go_first_and_cheap_ones_all_pass(seed):
    rng = random.Random(seed)
    cap = rng.uniform(0.6, 1.0)
    shed = OverloadShed(ShedConfig(capacity=cap, trigger=cap))
    cheap_cost = prefill_seconds(COST, 200) + 0.08e-3 * 128  # its prior output: half of max_new
    rate = 0.6 * cap / (0.85 * cheap_cost)  # the cheap 85% fill 60% of capacity; the dear ~1.2x it
    msgs = _arrivals(rng, rate, 0.0, 60.0, [(CHEAP, 17.0), (DEAR, 3.0)])
    passed = _run(shed, msgs)
    late = [m for m in msgs if m.arrival_s > 5.0]  # after the estimates settle
    cheap = [passed[m.rid] for m in late if m.slo.slo_class == "coding"]
    dear = [passed[m.rid] for m in late if m.slo.slo_class == "reasoning"]
    assert all(cheap)  # the cheap 85% fit well inside capacity: none given up
    assert 0 < sum(dear) < 0.9 * len(dear)  # dear ones rejected, the threshold bin partly admitted


def test_threshold_tightens_with_load():
    kept = []
    for rate in (20, 40, 80, 160):
        shed = OverloadShed(ShedConfig())
        msgs = _arrivals(random.Random(7), rate, 0.0, 60.0, [(CHEAP, 17.0), (DEAR, 3.0)])
        passed = _run(shed, msgs)
        kept.append(sum(passed[m.rid] for m in msgs if m.arrival_s > 5) / sum(m.arrival_s > 5 for m in msgs))
    assert kept == sorted(kept, reverse=True) and kept[0] == 1.0 and kept[-1] < 0.9


class _FixedLoads:
    def __init__(self, loads):
        self.value = loads

    def loads(self, t):
        return self.value


def test_hysteresis_holds_the_threshold_inside_its_band():
    shed = OverloadShed(ShedConfig(capacity=1.0, trigger=1.2, hysteresis=0.2))
    base = [(10, 0.4), (20, 0.3), (30, 0.5), (40, 0.6)]  # 1.8 GPU s/s arriving
    scaled = lambda f: [(j, f * x) for j, x in base]  # noqa: E731
    shed._bins = _FixedLoads(scaled(0.6))  # 1.08: over capacity, under the trigger: no shedding yet
    assert shed.threshold(0.0) == math.inf
    shed._bins.value = base
    p0 = shed.threshold(1.0)
    assert p0 == fill_position(base, 1.0) and 30 < p0 < 31
    shed._bins.value = scaled(0.9)  # a little less load: inside the band, the threshold holds
    assert shed.threshold(2.0) == p0
    shed._bins.value = scaled(1.05)  # more load: tightens at once
    p1 = shed.threshold(3.0)
    assert p1 < p0 and p1 == fill_position(scaled(1.05), 1.0)
    shed._bins.value = scaled(0.7)  # much less: loosens, but only to the (1 - h) fill
    p2 = shed.threshold(4.0)
    assert p2 > p1 and p2 == fill_position(scaled(0.7), 0.8)
    shed._bins.value = scaled(0.44)  # 0.79 <= 0.8: all fits the band's floor, shedding stops
    assert shed.threshold(5.0) == math.inf


def test_sessions_stay_whole():
    rng = random.Random(5)
    shed = OverloadShed(ShedConfig(capacity=0.3, trigger=0.3))
    msgs = _arrivals(rng, 60, 0.0, 30.0, [(CHEAP, 5.0), (DEAR, 5.0)], session_share=0.5)
    passed = _run(shed, msgs)
    assert 0 < shed.counters["shed"] < len(msgs)
    # later calls (dear ones: they would be shed) of every session whose first call passed
    later = [protos.RequestArrived(f"later-{m.rid}", 200, 4096, CLASSES["reasoning"], 31.0, session_id=m.session_id)
             for m in msgs if m.session_id]
    for m in later:
        shed.arrived(m)
    out = set(shed.decide(COST, ACC, DEPTH, 31.0))
    for m, first in zip(later, [m for m in msgs if m.session_id]):
        assert (m.rid in out) == (not passed[first.rid]), "a passed session lost a later call"


# ---- inside slo_unified ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_slo_unified_never_rejects_an_admitted_request_and_sheds_only_new_arrivals(seed):
    rng = random.Random(seed)
    pol = make_policy("slo_unified", shed_capacity=0.2, shed_trigger=0.2)  # overloaded at once
    st = make_state(rng, n_decoding=rng.randint(5, 60), n_prefilling=rng.randint(0, 10), n_waiting=0)
    acc = AcceptanceModel(H100.acceptance_priors)
    n = 0
    for step in range(30):
        st.now_s += 0.05
        for _ in range(rng.randint(0, 12)):  # new arrivals, a reasoning-heavy flood
            cls = rng.choice(["reasoning", "reasoning", "coding", "chat"])
            msg = protos.RequestArrived(f"n{n}", rng.randint(50, 3000), 4096 if cls == "reasoning" else 256,
                                        CLASSES[cls], st.now_s)
            n += 1
            st.add(msg)
            pol.observe(msg)
        admitted = {r.rid for r in st.requests.values() if r.is_admitted}
        plan = pol.plan(make_ctx(st, acc))
        check_plan_invariants(st, plan)
        rejected = {d.rid for d in plan.decisions if d.decision == Decision.REJECT}
        assert not rejected & admitted
        for d in plan.decisions:  # apply, as the planner does
            r = st.requests[d.rid]
            if d.decision == Decision.REJECT:
                r.decision = Decision.REJECT
            elif d.decision in (Decision.ADMIT, Decision.BEST_EFFORT):
                r.decision = Decision(d.decision)
    assert pol.counters["shed"] > 0


def test_overload_shed_off_is_main_behaviour():
    rng = random.Random(11)
    st = make_state(rng, n_decoding=40, n_prefilling=4, n_waiting=20)
    plans = []
    for overrides in ({"overload_shed": False}, {"overload_shed": True}):
        pol = make_policy("slo_unified", **overrides)
        for r in st.requests.values():  # arrivals far below capacity: nothing to shed
            if not r.is_admitted:
                pol.observe(protos.RequestArrived(r.rid, r.prompt_tokens, r.max_new_tokens, r.slo, r.arrival_s))
        plans.append(pol.plan(make_ctx(st)))
    assert plans[0] == plans[1]


def test_without_overload_a_simulated_run_is_the_same_with_the_shed_on_or_off():
    from eval.compare import make_workload
    from eval.simulator import simulate

    hw = "configs/hardware/h100-llama3.1-8b-eagle3.yaml"
    w = make_workload("mixed", hw, rate=4.0, duration_s=15.0, seed=0)
    runs = [simulate(w, hw, "slo_unified", seed=0, policy_overrides={"overload_shed": on}) for on in (False, True)]
    assert runs[0].records == runs[1].records  # the shed reads the planner's models, never moves them
