"""Algorithm cores of the policies against brute force / the papers' formulas."""

from __future__ import annotations

import itertools
import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st_

from protos import messages as protos
from sidecar.policies import adaserve
from sidecar.policies.base import make_policy
from sidecar.policies.dp_admission import Candidate, admit_brute_force, admit_dp, is_feasible
from sidecar.policies.edf_admission import Job, admit_edf
from sidecar.policies.spec_efficiency import choose_length, cumulative
from sidecar.policies.tier_planner import TierPlanner, acc, plan_tiers, tier_length
from test_policies_factories import H100, make_ctx, make_state

# ---- SLOs-Serve tier planner ----------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    tau_k=st_.floats(0.005, 0.5),
    tau_i=st_.floats(0.005, 0.5),
    j=st_.integers(1, 10),
    alpha=st_.floats(0.05, 0.95),
    max_len=st_.integers(1, 12),
)
def test_tier_length_matches_enumeration(tau_k, tau_i, j, alpha, max_len):
    """sl_k closed form == smallest sl with Acc(sl) >= Acc(j) * tau_i / tau_k."""
    need = acc(j, alpha) * tau_i / tau_k
    enumerated = next((sl for sl in range(1, max_len + 1) if acc(sl, alpha) >= need - 1e-12), max_len + 1)
    assert tier_length(tau_k, tau_i, j, alpha, max_len) == enumerated


def test_tier_length_paper_formula_example():
    # tau_k = 0.1, tau_i = 0.05, alpha = 0.7, j = 4: ceil(log((0.05 + 0.7^4 * 0.05) / 0.1) / log 0.7)
    expected = math.ceil(math.log((0.05 + 0.7**4 * 0.05) / 0.1) / math.log(0.7))
    assert tier_length(0.1, 0.05, 4, 0.7, 8) == expected == 2


def _ttb(period, steps):
    return H100.cost.max_tokens_within(period, steps, 200_000, 0)


@settings(max_examples=80, deadline=None)
@given(
    tiers=st_.lists(st_.tuples(st_.sampled_from([0.02, 0.03, 0.05, 0.1, 0.15]), st_.integers(0, 60)), min_size=1, max_size=4, unique_by=lambda t: t[0]),
    alpha=st_.floats(0.3, 0.9),
    max_len=st_.integers(1, 8),
)
def test_tier_planner_cache_equals_plan_tiers(tiers, alpha, max_len):
    tiers = sorted(tiers)
    taus = [t for t, _ in tiers]
    counts = [c for _, c in tiers]
    ref = plan_tiers(tiers, alpha, max_len, _ttb)
    got = TierPlanner(taus, alpha, max_len).best(counts, _ttb)
    assert got.prefill_per_batch == ref.prefill_per_batch
    assert math.isclose(got.period_s, ref.period_s)
    assert [got.lengths[k] for k, c in enumerate(counts) if c > 0] == list(ref.lengths)


def test_tier_plan_keeps_every_tier_on_pace():
    tiers = [(0.03, 20), (0.1, 40)]
    p = plan_tiers(tiers, 0.7, 8, _ttb)
    for (tau, _), sl in zip(tiers, p.lengths):
        assert acc(sl, 0.7) * tau >= p.period_s - 1e-12  # each batch commits a period's worth
    # Looser tier speculates no more than needed: one token less would fall behind.
    assert p.lengths[1] <= p.lengths[0] or acc(p.lengths[1] - 1, 0.7) * 0.1 < p.period_s


# ---- SLOs-Serve DP admission ------------------------------------------------------------------

def _random_instance(rng: random.Random, n_new: int, n_forced: int):
    n_tiers = rng.randint(1, 3)
    cands = []
    for _ in range(n_forced):
        cands.append(Candidate(rng.choice([0.0, rng.uniform(0, 1)]), rng.randint(0, 800), 0, rng.randrange(n_tiers), forced=True))
    for _ in range(n_new):
        cands.append(Candidate(rng.uniform(0.0, 2.0), rng.randint(1, 3000), rng.randint(100, 5000), rng.randrange(n_tiers), profit=rng.choice([1.0, 1.0, 2.0])))
    rates = [rng.uniform(-500, 4000) for _ in range(n_tiers)]
    base = rng.uniform(1000, 8000)

    def rate_of(counts):  # decreasing in load, can go negative (unsustainable)
        return base - sum(c * r * 0.3 for c, r in zip(counts, rates)) - 100 * sum(counts)

    mem = rng.randint(2000, 15000)
    return cands, rate_of, mem, n_tiers


def test_dp_admission_equals_brute_force():
    rng = random.Random(11)
    for trial in range(400):
        cands, rate_of, mem, n_tiers = _random_instance(rng, rng.randint(0, 7), rng.randint(0, 3))
        dp = admit_dp(cands, 0.0, mem, rate_of, n_tiers)
        bf = admit_brute_force(cands, 0.0, mem, rate_of, n_tiers)
        assert math.isclose(dp.profit, bf.profit), (trial, dp, bf)
        assert all(x for x, c in zip(dp.admitted, cands) if c.forced)  # admitted stay admitted
        if any(x and not c.forced for x, c in zip(dp.admitted, cands)):
            assert is_feasible(cands, dp.admitted, 0.0, mem, rate_of, n_tiers)


def test_dp_declines_what_cannot_meet_its_deadline():
    rate_of = lambda counts: 1000.0  # tokens / s
    cands = [Candidate(1.0, 900, 10, 0), Candidate(1.0, 900, 10, 0), Candidate(5.0, 100, 10, 0)]
    res = admit_dp(cands, 0.0, 10_000, rate_of, 1)
    assert sum(res.admitted[:2]) == 1 and res.admitted[2] and res.profit == 2.0


# ---- EDF / Moore-Hodgson admission (fixed rate: optimal count) -------------------------------

def test_edf_admission_maximizes_on_time_count():
    rng = random.Random(5)
    for _ in range(300):
        n = rng.randint(0, 7)
        jobs = [Job(rng.uniform(0.01, 2.0), rng.randint(1, 2000), 0.0) for _ in range(n)]
        got = admit_edf(jobs, 0.0, 2000.0, 0.0)

        def on_time(sub):
            t = 0.0
            for j in sorted(sub, key=lambda j: j.deadline_s):
                t += j.tokens / 2000.0
                if t > j.deadline_s:
                    return False
            return True

        best = max(
            (sum(bits) for bits in itertools.product((0, 1), repeat=n) if on_time([j for j, b in zip(jobs, bits) if b])),
            default=0,
        )
        chosen = [j for j, b in zip(jobs, got) if b]
        assert on_time(chosen) and len(chosen) == best


def test_edf_admission_keeps_forced_jobs():
    jobs = [Job(0.1, 10_000, 0.0, forced=True), Job(0.2, 10, 0.0)]
    assert admit_edf(jobs, 0.0, 1000.0, 0.0)[0]


# ---- SpecServe efficiency -------------------------------------------------------------------

def test_spec_length_is_argmax_goodput_under_guard():
    rng = random.Random(2)
    cost = H100.cost
    for _ in range(100):
        n = rng.randint(1, 300)
        alphas = [[rng.uniform(0.3, 0.95) for _ in range(8)] for _ in range(n)]
        ctx_tokens = rng.randint(0, 500_000)

        def time_of(verify, steps):
            return cost.iteration_time(0, verify, steps, ctx_tokens, max(0, verify - n))

        guard = rng.choice([float("inf"), 0.02, 0.01])
        choice = choose_length(alphas, time_of, 8, guard, trim=False)
        goodput = {
            k: (n + sum(sum(cumulative(a, k)) for a in alphas)) / time_of(n * (k + 1), k)
            for k in range(9)
            if k == 0 or time_of(n * (k + 1), k) <= guard
        }
        assert choice.k == max(goodput, key=goodput.get)
        trimmed = choose_length(alphas, time_of, 8, guard, trim=True)
        assert trimmed.goodput >= choice.goodput * (1 - 1e-9)
        assert all(0 <= l <= trimmed.k for l in trimmed.lengths)


def test_speculation_switches_off_under_heavy_load():
    cost = H100.cost
    n = 2000
    alphas = [[0.4] * 8] * n  # compute-bound batch, weak drafts: verifying drafts costs more than it yields
    choice = choose_length(alphas, lambda v, s: cost.iteration_time(0, v, s, 100_000, max(0, v - n)), 8)
    assert choice.k == 0
    light = choose_length([[0.8] * 8], lambda v, s: cost.iteration_time(0, v, s, 2000, max(0, v - 1)), 8)
    assert light.k >= 3


# ---- AdaServe A(r), depth, width, cap -------------------------------------------------------

def test_adaserve_min_tokens_match_formula_exactly():
    rng = random.Random(9)
    for trial in range(30):
        st = make_state(rng, rng.randint(1, 120), rng.randint(0, 3), 0)
        ctx = make_ctx(st)
        policy = make_policy("adaserve")
        plan = policy.plan(ctx)
        cfg = policy.config
        decoding = st.decoding()
        n = len(decoding)
        budget = max(min(cfg.budget_tokens or _knee(ctx, cfg), st.limits.max_batch_tokens), n)
        d = max(cfg.min_depth, min(cfg.max_depth, budget // (n + cfg.c1) - 1))
        d = min(d, st.limits.max_depth)
        w = max(1, min(cfg.max_width, st.limits.max_width, cfg.b2 // n + cfg.c2))
        n_max = max(1, min(1 + d * w, int(budget * 1.2 / n)))
        context = sum(r.prefilled + r.decoded for r in decoding)
        t_spec = H100.cost.iteration_time(0, budget, d, context, n * w * d)
        entries = {e.rid: e for e in plan.decode}
        covering = sum(e.tree_cap for e in plan.decode) + sum(c.tokens for c in plan.prefill)
        assert plan.token_budget == max(budget, covering)
        for r in decoding:
            e = entries[r.rid]
            a = ((ctx.now_s - r.first_token_s) + t_spec) / r.tpot_now - r.decoded
            assert e.min_tokens == max(1.0, min(a, d + 1))
            assert (e.depth, e.width, e.tree_cap) == (d, w, n_max)


def _knee(ctx, cfg):
    t1 = ctx.cost.iteration_time(0, 1, 0, 0)
    return ctx.cost.max_tokens_within(cfg.knee_factor * t1)


def test_adaserve_depth_and_width_rules():
    assert adaserve.adaptive_depth(n=10, b1=512, c1=0, d_min=4, d_max=8) == 8
    assert adaserve.adaptive_depth(n=100, b1=512, c1=0, d_min=4, d_max=8) == 4  # floor(5.12)-1 = 4
    assert adaserve.adaptive_depth(n=80, b1=512, c1=4, d_min=2, d_max=8) == 5  # floor(512/84)-1
    assert adaserve.adaptive_width(n=100, b2=512, c2=0, w_max=3) == 3
    assert adaserve.adaptive_width(n=300, b2=512, c2=0, w_max=3) == 1
    assert adaserve.min_tokens_needed(1.0, 0.02, 0.05, 18) == (1.0 + 0.02) / 0.05 - 18


# ---- slo_unified: deadline-driven trees -----------------------------------------------------

def test_unified_behind_requests_get_bigger_trees_than_ahead_ones():
    rng = random.Random(4)
    st = make_state(rng, 2, 0, 0)
    behind, ahead = st.decoding()
    for r in (behind, ahead):
        r.slo = protos.Slo(0.5, 0.03, slo_class="coding")
        r.arrival_s = st.now_s - 10.0
        r.first_token_s = st.now_s - 9.5
    behind.decoded = 300  # due: 9.5 s / 30 ms ~ 316 tokens -> behind
    ahead.decoded = 400  # ahead of its schedule
    plan = make_policy("slo_unified").plan(make_ctx(st))
    e = {x.rid: x for x in plan.decode}
    assert e[behind.rid].min_tokens > 1.0 and e[behind.rid].tree_cap > 1
    assert e[ahead.rid].min_tokens == 1.0


def test_unified_think_stage_is_tighter_than_answer_stage():
    rng = random.Random(6)
    st = make_state(rng, 2, 0, 0)
    think, answer = st.decoding()
    slo = protos.Slo(1.0, 0.03, stages=[protos.Stage(0.03, tokens=1000), protos.Stage(0.1)], slo_class="reasoning")
    for r in (think, answer):
        r.slo = slo
        r.arrival_s = st.now_s - 11.0
        r.first_token_s = st.now_s - 10.0
    think.decoded = 330  # think stage: due ~333 tokens by now
    answer.decoded, answer.stage, answer.stage_starts = 1200, 1, [0, 1000]  # answer: due ~1000 + ~(10-30)/0.1
    plan = make_policy("slo_unified").plan(make_ctx(st))
    e = {x.rid: x for x in plan.decode}
    assert e[think.rid].min_tokens > e[answer.rid].min_tokens == 1.0


def test_unified_rejects_late_requests_but_keeps_agent_sessions_best_effort():
    rng = random.Random(8)
    st = make_state(rng, 10, 0, 3)
    late, late_call, fine = st.waiting()
    late.arrival_s = late_call.arrival_s = st.now_s - 5.0  # TTFT deadlines long gone
    late_call.session_id = "agent-1"
    fine.arrival_s = st.now_s
    fine.slo = protos.Slo(5.0, 0.1, slo_class="chat")
    plan = make_policy("slo_unified", reject_late=True).plan(make_ctx(st))
    d = {x.rid: x.decision for x in plan.decisions}
    assert d[late.rid] == protos.Decision.REJECT
    assert d.get(late_call.rid, protos.Decision.BEST_EFFORT) == protos.Decision.BEST_EFFORT
    assert d[fine.rid] == protos.Decision.ADMIT
    keep = make_policy("slo_unified").plan(make_ctx(st))  # default: late ones run best effort
    assert all(x.decision != protos.Decision.REJECT for x in keep.decisions)
    assert {x.rid: x.decision for x in keep.decisions}.get(late.rid) in (None, protos.Decision.BEST_EFFORT)
