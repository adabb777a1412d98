"""The simulator's batch builder makes the same decisions as the embedded engine's scheduler.

Differential test: random queue states and random plans (decisions, chunks, entries, budgets,
stale plans) are given to both `eval.sim_scheduler.SimScheduler` and
`sglang_slo.engine.scheduler.Scheduler` (the real one, torch-backed block tables); their
batches, preemptions and resulting queue/KV states must agree exactly.
"""

import pytest

pytest.importorskip("torch")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from eval.kv_blocks import KvBlocks  # noqa: E402
from eval.metrics import RequestRecord  # noqa: E402
from eval.sim_request import SimRequest, Status  # noqa: E402
from eval.sim_scheduler import SchedulerLimits, SimScheduler  # noqa: E402
from eval.workloads import GenRequest  # noqa: E402
from protos import messages as protos  # noqa: E402
from sglang_slo.engine.block_tables import BlockPool, BlockTables  # noqa: E402
from sglang_slo.engine.request import Request, RequestStatus, SamplingParams  # noqa: E402
from sglang_slo.engine.scheduler import Scheduler, SchedulerConfig  # noqa: E402

MAX_RUNNING = 6


@st.composite
def scenarios(draw):
    n = draw(st.integers(1, 8))
    reqs = []
    for i in range(n):
        prompt = draw(st.integers(1, 200))
        max_new = draw(st.integers(1, 60))
        state = draw(st.sampled_from(["new", "preempted", "prefilling", "decoding"]))
        decoded = draw(st.integers(1, max_new)) if state in ("preempted", "decoding") else 0
        decoded = min(decoded, max_new - 1) if max_new > 1 else 0
        if state == "decoding" and decoded == 0:
            state = "prefilling"
        target = prompt + decoded - 1 if decoded else prompt
        computed = {"new": 0, "preempted": 0, "decoding": target,
                    "prefilling": draw(st.integers(0, max(0, target - 1)))}[state]
        reqs.append(dict(rid=f"r{i}", prompt=prompt, max_new=max_new, decoded=decoded, computed=computed,
                         running=state in ("prefilling", "decoding"), tpot=draw(st.sampled_from([0.03, 0.1])),
                         ttft=draw(st.sampled_from([0.3, 1.0])), arrival=draw(st.floats(0, 2)),
                         best_effort=draw(st.booleans()), first=draw(st.floats(0, 3))))
    rids = [r["rid"] for r in reqs]
    plan = None
    if draw(st.booleans()):
        decisions = [protos.AdmissionDecision(rid, protos.Decision(draw(st.integers(0, 4))))
                     for rid in draw(st.lists(st.sampled_from(rids), max_size=3, unique=True))]
        prefill = [protos.PrefillChunk(rid, draw(st.integers(1, 150)))
                   for rid in draw(st.lists(st.sampled_from(rids), max_size=4, unique=True))]
        decode = [protos.DecodeEntry(rid, draw(st.floats(1, 5)), draw(st.integers(1, 12)), draw(st.integers(0, 6)),
                                     draw(st.integers(1, 3)))
                  for rid in draw(st.lists(st.sampled_from(rids), max_size=6, unique=True))]
        plan = protos.Plan(step=1, valid_until_s=draw(st.sampled_from([-1.0, 10.0])),
                           token_budget=draw(st.integers(1, 300)), prefill=prefill, decode=decode,
                           decisions=decisions, spec_depth=draw(st.sampled_from([-1, -1, 2])))
    block = draw(st.sampled_from([1, 4, 16]))
    if draw(st.booleans()):  # tight: running requests fill the cache, so decodes must preempt
        running = [r for r in reqs if r["running"]][:MAX_RUNNING]
        kv_blocks = max(1, sum(-(-r["computed"] // block) for r in running) + draw(st.integers(0, 1)))
    else:
        kv_blocks = draw(st.integers(4, 60)) * (16 // block)
    return reqs, plan, (kv_blocks, block)


def build(reqs, kv):
    kv_blocks, block = kv
    eng = Scheduler(SchedulerConfig(max_batch_tokens=256, max_running=MAX_RUNNING, max_depth=4, max_width=2,
                                    fallback_budget=64), BlockTables(BlockPool.create(kv_blocks, block)),
                    max_context=1 << 20)
    sim = SimScheduler(SchedulerLimits(max_batch_tokens=256, max_running=MAX_RUNNING, max_depth=4, max_width=2,
                                       fallback_budget=64), KvBlocks(kv_blocks * block, block))
    for r in reqs:
        slo = protos.Slo(ttft_s=r["ttft"], tpot_s=r["tpot"], best_effort=r["best_effort"])
        e = Request(rid=r["rid"], prompt_ids=[1] * r["prompt"], params=SamplingParams(max_new_tokens=r["max_new"]),
                    slo=slo, arrival_s=r["arrival"], output_ids=[1] * r["decoded"], num_computed=r["computed"],
                    first_token_s=r["first"] if r["decoded"] else 0.0)
        g = GenRequest(rid=r["rid"], arrival_s=r["arrival"], prompt_tokens=r["prompt"], output_tokens=r["max_new"],
                       max_new_tokens=r["max_new"], slo=slo, alphas=[0.8])
        s = SimRequest(gen=g, record=RequestRecord(rid=r["rid"], slo=slo, arrival_s=r["arrival"]),
                       arrival_s=r["arrival"], computed=r["computed"], decoded=r["decoded"],
                       first_token_s=r["first"] if r["decoded"] else 0.0)
        fits = r["running"] and len(eng.running) < MAX_RUNNING and eng.kv.grow(r["rid"], r["computed"])
        if fits:
            assert sim.kv.grow(r["rid"], r["computed"])
            e.status, s.status = RequestStatus.RUNNING, Status.RUNNING
            eng.running.append(e)
            sim.running.append(s)
        else:
            e.num_computed = s.computed = 0
            eng.waiting.append(e)
            sim.add(s)
    return eng, sim


def eng_view(sched, batch):
    return dict(
        prefill=[(p.req.rid, p.num_tokens) for p in batch.prefills],
        decode=[(w.req.rid, w.depth, w.width, w.tree_cap, round(w.min_tokens, 9)) for w in batch.decodes],
        budget=batch.token_budget, plan_step=batch.plan_step,
        rejected=[r.rid for r in batch.rejected], failed=[r.rid for r, _ in batch.failed],
        waiting=[r.rid for r in sched.waiting], running=[r.rid for r in sched.running],
        computed={r.rid: r.num_computed for r in sched.waiting + sched.running},
        decision={r.rid: int(r.decision) for r in sched.waiting + sched.running},
        free=sched.kv.free_tokens)


def sim_view(sched, batch):
    return dict(
        prefill=[(r.rid, n) for r, n in batch.prefills],
        decode=[(w.req.rid, w.depth, w.width, w.tree_cap, round(w.min_tokens, 9)) for w in batch.decodes],
        budget=batch.token_budget, plan_step=batch.plan_step,
        rejected=[r.rid for r in batch.rejected], failed=[r.rid for r in batch.failed],
        waiting=[r.rid for r in sched.waiting], running=[r.rid for r in sched.running],
        computed={r.rid: r.computed for r in sched.waiting + sched.running},
        decision={r.rid: int(r.decision) for r in sched.waiting + sched.running},
        free=sched.kv.free_blocks * sched.kv.block_tokens)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_same_batches_as_the_engine(scenario):
    reqs, plan, kv = scenario
    eng, sim = build(reqs, kv)
    for now in (0.5, 1.5):  # two rounds: the second sees the first one's last budget/entries
        eb = eng.schedule(plan, now)
        sb = sim.schedule(plan, now)
        assert sim_view(sim, sb) == eng_view(eng, eb)
