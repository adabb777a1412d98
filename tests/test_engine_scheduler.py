"""Scheduler: plan application, EDF fallback, KV reservation and preemption (no model needed)."""

from __future__ import annotations

import random

import pytest

from protos import messages as protos
from sglang_slo.engine.block_tables import BlockPool, BlockTables
from sglang_slo.engine.request import InvalidRequestError, Request, RequestStatus, SamplingParams
from sglang_slo.engine.scheduler import Scheduler, SchedulerConfig


def make_scheduler(num_blocks=64, block_size=4, draft_blocks=64, max_context=512, **cfg) -> Scheduler:
    kv = BlockTables(BlockPool.create(num_blocks, block_size),
                     BlockPool.create(draft_blocks, block_size) if draft_blocks else None)
    cfg.setdefault("fallback_budget", 64)
    return Scheduler(SchedulerConfig(**cfg), kv, max_context=max_context)


def make_request(rid: str, prompt_len=10, max_new=8, ttft=1.0, tpot=0.1, arrival=0.0, best_effort=False) -> Request:
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_new_tokens=max_new),
                   protos.Slo(ttft_s=ttft, tpot_s=tpot, best_effort=best_effort), arrival_s=arrival)


def fake_run(sched: Scheduler, batch) -> None:
    """What the runner + engine postprocess do to request state, without a model."""
    for p in batch.prefills:
        r = p.req
        r.num_computed += p.num_tokens
        if not r.is_prefilling and not r.output_ids:
            r.output_ids.append(7)
    for d in batch.decodes:
        r = d.req
        accepted = min(d.depth, random.randint(0, d.depth))
        r.num_computed = r.num_tokens + accepted
        r.output_ids += [7] * (accepted + 1)
        sched.kv.shrink(r.rid, r.num_computed, r.num_computed)
        if r.num_output_tokens >= r.params.max_new_tokens:
            r.status = RequestStatus.FINISHED
            sched.remove(r)


def plan(step=0, budget=64, valid=10.0, prefill=(), decode=(), decisions=()) -> protos.Plan:
    return protos.Plan(step=step, valid_until_s=valid, token_budget=budget,
                       prefill=[protos.PrefillChunk(r, n) for r, n in prefill],
                       decode=[protos.DecodeEntry(r, min_tokens=a, tree_cap=c, depth=d, width=w)
                               for r, a, c, d, w in decode],
                       decisions=[protos.AdmissionDecision(r, d) for r, d in decisions])


def test_fallback_admits_by_ttft_deadline_and_chunks_prefill_to_budget():
    s = make_scheduler(fallback_budget=16)
    late, early = make_request("late", prompt_len=12, ttft=5.0), make_request("early", prompt_len=12, ttft=0.5)
    s.add(late)
    s.add(early)
    b = s.schedule(None, now=0.0)
    assert b.plan_step == -1
    assert [(p.req.rid, p.num_tokens) for p in b.prefills] == [("early", 12), ("late", 4)]
    assert b.num_prefill_tokens == 16
    fake_run(s, b)
    b = s.schedule(None, now=0.1)  # early decodes first (root), late's prefill gets the rest
    assert [d.req.rid for d in b.decodes] == ["early"]
    assert [(p.req.rid, p.num_tokens) for p in b.prefills] == [("late", 8)]


def test_fresh_plan_is_applied_and_stale_plan_falls_back():
    s = make_scheduler()
    for rid in "abc":
        s.add(make_request(rid, prompt_len=8))
    p = plan(step=3, budget=20, prefill=[("b", 5), ("a", 8)],
             decisions=[("c", protos.Decision.REJECT)])
    b = s.schedule(p, now=1.0)
    assert b.plan_step == 3 and b.token_budget == 20
    assert [(w.req.rid, w.num_tokens) for w in b.prefills] == [("b", 5), ("a", 8)]
    assert [r.rid for r in b.rejected] == ["c"]
    assert all(r.rid != "c" for r in s.waiting + s.running)
    fake_run(s, b)
    b = s.schedule(p, now=11.0)  # past valid_until_s
    assert b.plan_step == -1
    assert b.token_budget == 20  # fallback keeps the last planned budget


def test_plan_decode_entries_are_clamped_to_engine_limits_and_budget():
    s = make_scheduler(max_depth=4, max_width=2)
    s.add(make_request("a", prompt_len=4, max_new=50))
    fake_run(s, s.schedule(None, 0.0))
    b = s.schedule(plan(budget=64, decode=[("a", 2.5, 40, 9, 7)]), now=0.0)
    (d,) = b.decodes
    assert (d.depth, d.width, d.tree_cap, d.min_tokens) == (4, 2, 9, 2.5)  # cap <= 1 + depth*width
    b = s.schedule(plan(budget=3, decode=[("a", 2.5, 40, 9, 7)]), now=0.0)
    assert b.decodes[0].tree_cap == 3  # never more than the budget
    # Near max_new_tokens the tree cannot be deeper than the tokens still allowed.
    a = s.running[0]
    a.output_ids += [7] * (a.params.max_new_tokens - a.num_output_tokens - 2)
    a.num_computed = a.num_tokens - 1
    b = s.schedule(plan(budget=64, decode=[("a", 2.5, 40, 9, 7)]), now=0.0)
    assert b.decodes[0].depth == 1


def test_batch_wide_spec_depth_overrides_entries():
    s = make_scheduler(max_depth=6, max_width=2)
    s.add(make_request("a", prompt_len=4, max_new=50))
    fake_run(s, s.schedule(None, 0.0))
    p = plan(budget=64, decode=[("a", 1.0, 3, 1, 2)])
    p.spec_depth = 3
    (d,) = s.schedule(p, now=0.0).decodes
    assert (d.depth, d.width, d.tree_cap) == (3, 2, 7)


def test_plan_preempt_frees_kv_and_requeues():
    s = make_scheduler()
    s.add(make_request("a"))
    fake_run(s, s.schedule(None, 0.0))
    assert s.kv.table("a")
    b = s.schedule(plan(decisions=[("a", protos.Decision.PREEMPT)]), now=0.0)
    a = s.waiting[0]
    assert a.rid == "a" and a.status is RequestStatus.WAITING and a.num_computed == 0
    assert not s.kv.table("a") and not b.decodes
    # Recompute covers prompt + outputs but the root; no new token is sampled for it.
    assert a.prefill_target == a.num_tokens - 1


def test_decisions_apply_once_per_plan():
    s = make_scheduler()
    s.add(make_request("a"))
    fake_run(s, s.schedule(None, 0.0))
    p = plan(prefill=[("a", 64)], decisions=[("a", protos.Decision.PREEMPT)])
    s.schedule(p, now=0.0)  # preempted, then re-admitted by the plan's own prefill chunk
    assert s.running[0].rid == "a" and s.num_preemptions == 1
    fake_run(s, s.schedule(p, now=0.0))  # the same plan again: no second preemption
    assert s.num_preemptions == 1 and s.running[0].rid == "a"


def test_kv_exhaustion_preempts_best_effort_first_never_crashes():
    # 10 blocks of 4 tokens: room for two 16-token requests, not three.
    s = make_scheduler(num_blocks=10, block_size=4, draft_blocks=0, fallback_budget=64)
    reqs = [make_request("be", prompt_len=15, best_effort=True, ttft=0.1, max_new=40),
            make_request("x", prompt_len=15, ttft=0.2, max_new=40)]
    for r in reqs:
        s.add(r)
    fake_run(s, s.schedule(None, 0.0))
    s.add(make_request("y", prompt_len=3, ttft=0.05, max_new=40))
    seen_preempt = False
    for _ in range(30):
        b = s.schedule(None, 0.0)
        fake_run(s, b)
        seen_preempt |= reqs[0].num_preemptions > 0
        assert reqs[1].num_preemptions == 0 or seen_preempt
        used = sum(len(s.kv.table(r.rid)) for r in s.running)
        assert used == s.kv.target.allocator.num_used <= 10
    assert seen_preempt


def test_request_longer_than_the_whole_cache_fails_cleanly():
    s = make_scheduler(num_blocks=2, block_size=4, draft_blocks=0)
    s.add(make_request("big", prompt_len=7, max_new=20))
    failed = []
    for _ in range(10):
        b = s.schedule(None, 0.0)
        failed += b.failed
        fake_run(s, b)
    assert [r.rid for r, _ in failed] == ["big"]
    assert s.kv.target.allocator.num_used == 0 and not s.has_work


@pytest.mark.parametrize("bad", [
    dict(max_new_tokens=0), dict(max_new_tokens=1.5), dict(temperature=-1.0),
    dict(temperature=float("nan")), dict(top_p=0.0), dict(top_p=1.5),
    dict(stop_token_ids=(-1,)), dict(seed="x"),
])
def test_invalid_sampling_params_raise_typed_error(bad):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**bad).validate()


def test_random_schedules_never_leak_blocks():
    rng = random.Random(0)
    random.seed(1)
    s = make_scheduler(num_blocks=40, block_size=4, draft_blocks=40, max_depth=4, max_width=2,
                       fallback_budget=24)
    n = 0
    for it in range(600):
        if rng.random() < 0.3:
            s.add(make_request(f"r{n}", prompt_len=rng.randint(1, 30), max_new=rng.randint(1, 20),
                               ttft=rng.random(), best_effort=rng.random() < 0.2))
            n += 1
        live = s.waiting + s.running
        p = None
        if live and rng.random() < 0.6:
            p = plan(step=it, budget=rng.randint(1, 40),
                     prefill=[(r.rid, rng.randint(1, 16)) for r in rng.sample(live, min(3, len(live)))],
                     decode=[(r.rid, 1 + 2 * rng.random(), rng.randint(1, 9), rng.randint(0, 4), rng.randint(1, 2))
                             for r in s.running],
                     decisions=[(r.rid, rng.choice(list(protos.Decision))) for r in rng.sample(live, 1)]
                     if rng.random() < 0.2 else [])
        b = s.schedule(p, now=0.0)
        assert b.num_prefill_tokens + len(b.decodes) <= max(b.token_budget, len(b.decodes))
        fake_run(s, b)
        if s.running and rng.random() < 0.05:  # abort
            s.remove(rng.choice(s.running))
        held = sum(len(s.kv.table(r.rid)) for r in s.running)
        assert held == s.kv.target.allocator.num_used
        assert all(not s.kv.table(r.rid) for r in s.waiting)
    for r in list(s.waiting + s.running):
        s.remove(r)
    s.kv.target.allocator.check_consistent(expected_used=0)
    s.kv.draft.allocator.check_consistent(expected_used=0)
