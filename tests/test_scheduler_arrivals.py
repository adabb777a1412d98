"""Scheduler: requests that arrive after the plan in force was made (`Plan.arrival_tokens`).

Without the allowance a newcomer waits for a plan that lists it: the plan for step k+2 is
made from report k, so at least two iterations. With it, the newcomer's whole prompt joins
the first iteration after its arrival, as in the SGLang plugin (prefill_adder.py).
"""

from __future__ import annotations

from protos import messages as protos
from sglang_slo.engine.block_tables import BlockPool, BlockTables
from sglang_slo.engine.request import Request, RequestStatus, SamplingParams
from sglang_slo.engine.scheduler import Scheduler, SchedulerConfig


def make_scheduler(num_blocks=64, block_size=4, **cfg) -> Scheduler:
    kv = BlockTables(BlockPool.create(num_blocks, block_size), BlockPool.create(num_blocks, block_size))
    cfg.setdefault("fallback_budget", 64)
    cfg.setdefault("honour_arrival_tokens", True)  # the server's setting (runtime.py)
    return Scheduler(SchedulerConfig(**cfg), kv, max_context=512)


def make_request(rid: str, prompt_len=10, ttft=1.0) -> Request:
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_new_tokens=8),
                   protos.Slo(ttft_s=ttft, tpot_s=0.1), arrival_s=0.0)


def plan(step=0, budget=1, valid=10.0, prefill=(), decode=(), decisions=(), arrival_tokens=0,
         based_on=0) -> protos.Plan:
    return protos.Plan(step=step, valid_until_s=valid, token_budget=budget, based_on_step=based_on,
                       prefill=[protos.PrefillChunk(r, n) for r, n in prefill],
                       decode=[protos.DecodeEntry(r) for r in decode],
                       decisions=[protos.AdmissionDecision(r, d) for r, d in decisions],
                       arrival_tokens=arrival_tokens)


def with_decoder(**cfg) -> Scheduler:
    """A scheduler whose one running request "d" has its prompt prefilled (it decodes next)."""
    s = make_scheduler(**cfg)
    s.add(make_request("d", prompt_len=8))
    b = s.schedule(None, now=0.0)
    assert [(p.req.rid, p.num_tokens) for p in b.prefills] == [("d", 8)]
    d = b.prefills[0].req
    d.num_computed = 8
    d.output_ids.append(7)
    return s


def prefills(batch) -> list[tuple[str, int]]:
    return [(p.req.rid, p.num_tokens) for p in batch.prefills]


def test_arrival_prefills_whole_in_the_first_iteration_under_the_allowance():
    s = with_decoder()
    p = plan(step=2, budget=1, decode=["d"], arrival_tokens=32)  # made before "n" arrived
    s.add(make_request("n", prompt_len=20))
    b = s.schedule(p, now=1.0)
    assert b.plan_step == 2
    assert [w.req.rid for w in b.decodes] == ["d"]
    assert prefills(b) == [("n", 20)]  # whole, now: not a plan or two later
    assert b.token_budget == 1 + 20  # the plan's own budget stays the decoders'
    assert s.running[-1].rid == "n" and s.running[-1].status is RequestStatus.RUNNING
    assert s.num_arrivals_admitted == 1


def test_allowance_is_one_prefill_per_plan_whole_prompts_only():
    s = with_decoder()
    p = plan(step=2, budget=1, decode=["d"], arrival_tokens=24)
    s.add(make_request("big", prompt_len=30))  # past the allowance: never cut into chunks
    s.add(make_request("a", prompt_len=10, ttft=0.5))
    s.add(make_request("b", prompt_len=10, ttft=0.8))
    b = s.schedule(p, now=1.0)
    assert prefills(b) == [("a", 10), ("b", 10)]  # EDF, within 24 tokens
    s.add(make_request("c", prompt_len=4))
    b = s.schedule(p, now=1.1)  # the same plan again: its allowance was spent
    assert prefills(b) == []
    b = s.schedule(plan(step=3, budget=1, decode=["d"], arrival_tokens=24), now=1.2)
    assert prefills(b) == [("c", 4)]  # "big" still waits for a plan that lists it


def test_requests_the_plan_knows_are_not_arrivals():
    s = with_decoder()  # ran step 0
    s.add(make_request("deferred", prompt_len=6))
    p = plan(step=2, budget=1, decode=["d"], decisions=[("deferred", protos.Decision.DEFER)], arrival_tokens=32)
    assert prefills(s.schedule(p, now=1.0)) == []  # step 1
    s.add(make_request("unlisted", prompt_len=6))  # queued before step 2 ran
    # A plan made from report 2 saw it and left it out: it is not an arrival to that plan.
    assert prefills(s.schedule(plan(step=4, budget=1, decode=["d"], arrival_tokens=32, based_on=2), now=1.1)) == []
    b = s.schedule(plan(step=4, budget=1, decode=["d"], arrival_tokens=32, based_on=1), now=1.2)
    assert prefills(b) == [("unlisted", 6)]  # one made from report 1 had not seen it


def test_without_the_allowance_or_with_it_off_arrivals_wait_for_a_plan():
    for cfg, allowance in (({}, 0), ({"honour_arrival_tokens": False}, 32)):
        s = with_decoder(**cfg)
        s.add(make_request("n", prompt_len=20))
        b = s.schedule(plan(step=2, budget=1, decode=["d"], arrival_tokens=allowance), now=1.0)
        assert prefills(b) == [] and [w.req.rid for w in b.decodes] == ["d"]


def test_fallback_after_a_plan_expired_keeps_its_arrival_room():
    """A covering budget (the planned work exactly) must not become the fallback's whole
    budget: a newcomer would be prefilled one or two tokens per iteration."""
    s = with_decoder()
    s.schedule(plan(step=2, budget=1, valid=1.0, decode=["d"], arrival_tokens=40), now=0.5)
    s.add(make_request("n", prompt_len=30))
    b = s.schedule(None, now=2.0)  # the plan expired
    assert b.plan_step == -1 and b.token_budget == 41
    assert [w.req.rid for w in b.decodes] == ["d"] and prefills(b) == [("n", 30)]
