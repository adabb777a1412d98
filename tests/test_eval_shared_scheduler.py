"""The simulator builds its batches with the embedded engine's own Scheduler (one set of rules).

Behavioural checks: changing the engine's Scheduler changes the simulator; an engine-only
rule (a plan's decisions act once, not on every step the plan covers) holds in the
simulator; and the simulator stays torch-free although it runs engine code.
"""

import subprocess
import sys
from pathlib import Path

from eval.kv_blocks import KvBlocks
from eval.metrics import Outcome, RequestRecord
from eval.sim_request import SimRequest, Status
from eval.sim_scheduler import SchedulerLimits, SimScheduler
from eval.simulator import simulate
from eval.compare import make_workload
from eval.workloads import GenRequest
from protos import messages as protos
from sglang_slo.engine.scheduler import Scheduler

ROOT = Path(__file__).resolve().parents[1]
H100 = str(ROOT / "configs/hardware/h100-llama3.1-8b-eagle3.yaml")


def test_simulator_runs_the_engine_scheduler(monkeypatch):
    w = make_workload("mixed", H100, rate=4.0, duration_s=3.0, seed=0)
    base = simulate(w, H100, None, seed=0)  # local fallback policy only
    assert sum(r.outcome is Outcome.FINISHED for r in base.records) == len(base.records) > 0
    # The engine's fallback admits nothing any more -> the simulated engine runs nothing.
    monkeypatch.setattr(Scheduler, "_fallback_prefill_order", lambda self: [])
    starved = simulate(w, H100, None, seed=0)
    assert starved.stats["iterations"] == 0
    assert all(r.outcome is Outcome.UNFINISHED for r in starved.records)


def _running(rid: str, prompt: int, decoded: int) -> SimRequest:
    slo = protos.Slo(ttft_s=1.0, tpot_s=0.1)
    g = GenRequest(rid=rid, arrival_s=0.0, prompt_tokens=prompt, output_tokens=50, max_new_tokens=50, slo=slo,
                   alphas=[0.8])
    return SimRequest(gen=g, record=RequestRecord(rid=rid, slo=slo, arrival_s=0.0), status=Status.RUNNING,
                      num_computed=prompt + decoded - 1, decoded=decoded)


def _scheduler_running_a() -> tuple[SimScheduler, SimRequest]:
    """A simulator scheduler with one decoding request "a" (20-token prompt, 3 decoded)."""
    kv = KvBlocks(10_000, 16)
    sched = SimScheduler(SchedulerLimits(max_batch_tokens=512, max_running=8, max_depth=8, max_width=4,
                                         fallback_budget=64), kv)
    a = _running("a", 20, 3)
    assert kv.grow("a", a.num_computed + 1)
    sched.running.append(a)
    return sched, a


def test_plan_decisions_act_once_per_plan_in_the_simulator():
    sched, a = _scheduler_running_a()
    plan = protos.Plan(step=1, valid_until_s=10.0, token_budget=64,
                       prefill=[protos.PrefillChunk("a", 64)],
                       decisions=[protos.AdmissionDecision("a", protos.Decision.PREEMPT)])
    first = sched.schedule(plan, 0.0)
    assert first.preempted == [a] and a.num_preemptions == 1
    assert [(p.req, p.num_tokens) for p in first.prefills] == [(a, 22)]  # recomputed at once
    a.num_computed += 22
    again = sched.schedule(plan, 0.1)  # same plan, next step: no second preemption
    assert again.preempted == [] and a.num_preemptions == 1 and a.status is Status.RUNNING
    assert [w.req for w in again.decodes] == [a]


def test_simulator_stays_torch_free():
    code = ("import sys; from eval.simulator import simulate; from eval.compare import make_workload; "
            f"w = make_workload('mixed', {H100!r}, rate=2.0, duration_s=1.0, seed=0); simulate(w, {H100!r}, 'fcfs'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def _waiting(rid: str, prompt: int) -> SimRequest:
    slo = protos.Slo(ttft_s=1.0, tpot_s=0.1)
    g = GenRequest(rid=rid, arrival_s=0.0, prompt_tokens=prompt, output_tokens=50, max_new_tokens=50, slo=slo,
                   alphas=[0.8])
    return SimRequest(gen=g, record=RequestRecord(rid=rid, slo=slo, arrival_s=0.0))


def test_prefill_only_plan_makes_running_requests_wait():
    """SGLang's default iteration: a plan with chunks and no decode entries runs only the
    chunks; once they cannot run, the same plan decodes instead of idling."""
    sched, a = _scheduler_running_a()
    b = _waiting("b", 100)
    sched.add(b)
    plan = protos.Plan(step=1, valid_until_s=10.0, token_budget=512, prefill=[protos.PrefillChunk("b", 100)],
                       decisions=[protos.AdmissionDecision("b", protos.Decision.ADMIT)])
    first = sched.schedule(plan, 0.0)
    assert [(p.req.rid, p.num_tokens) for p in first.prefills] == [("b", 100)] and first.decodes == []
    b.num_computed += 100
    b.decoded = 1
    again = sched.schedule(plan, 0.1)  # b's prompt is done: nothing to prefill -> decode
    assert again.prefills == [] and sorted(w.req.rid for w in again.decodes) == ["a", "b"]
    # With a decode entry the same chunk runs mixed with a's decode (the other mode).
    c = _waiting("c", 40)
    sched.add(c)
    mixed = sched.schedule(protos.Plan(step=2, valid_until_s=10.0, token_budget=512,
                                       prefill=[protos.PrefillChunk("c", 40)],
                                       decode=[protos.DecodeEntry("a")],
                                       decisions=[protos.AdmissionDecision("c", protos.Decision.ADMIT)]), 0.2)
    assert [p.req.rid for p in mixed.prefills] == ["c"] and "a" in [w.req.rid for w in mixed.decodes]
