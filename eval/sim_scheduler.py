"""The simulated engine's batch builder: applies the planner's plan, or the local EDF policy.

A line-for-line mirror of the embedded engine's rules (sglang_slo/engine/scheduler.py),
written against the simulator's block accounting because that module imports torch:
- a plan is used iff `now <= plan.valid_until_s`; its decisions apply first (REJECT,
  PREEMPT, ADMIT/BEST_EFFORT/DEFER), its budget becomes the last budget; a batch-wide
  `spec_depth >= 0` overrides every entry's depth;
- decodes: the plan's order, then running requests it left out by next-token deadline
  (fallback: best effort last, then EDF), each with its planned depth/width/tree cap
  (fallback: its last planned entry, else plain decode), 1 budget token per root;
- KV for root + tree is reserved before a request enters the batch; when it cannot be,
  the tree shrinks to a plain decode, then the running request with the latest deadline
  (best effort first) is preempted (recomputed later);
- prefills: the plan's chunks in order (fallback: running prefills, then waiting requests,
  by TTFT deadline, best effort last, admitted only if the whole prompt + one block fits)
  with what the decodes' tree caps leave of B.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from eval.kv_blocks import KvBlocks
from eval.sim_request import SimRequest, Status
from protos import messages as protos

Decision = protos.Decision


@dataclass(frozen=True)
class SchedulerLimits:
    max_batch_tokens: int
    max_running: int
    max_depth: int
    max_width: int
    fallback_budget: int
    """Token budget before any plan arrived."""


@dataclass
class DecodeWork:
    req: SimRequest
    depth: int = 0
    width: int = 1
    tree_cap: int = 1
    min_tokens: float = 1.0


@dataclass
class Batch:
    prefills: list[tuple[SimRequest, int]] = field(default_factory=list)
    decodes: list[DecodeWork] = field(default_factory=list)
    token_budget: int = 0
    plan_step: int = -1
    rejected: list[SimRequest] = field(default_factory=list)
    failed: list[SimRequest] = field(default_factory=list)
    preempted: list[SimRequest] = field(default_factory=list)

    @property
    def prefill_tokens(self) -> int:
        return sum(n for _, n in self.prefills)

    @property
    def verify_budget(self) -> int:
        return max(len(self.decodes), self.token_budget - self.prefill_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.prefills and not self.decodes


class SimScheduler:
    def __init__(self, limits: SchedulerLimits, kv: KvBlocks):
        self.limits = limits
        self.kv = kv
        self.waiting: list[SimRequest] = []
        self.running: list[SimRequest] = []
        self.last_budget = limits.fallback_budget
        self.last_entries: dict[str, protos.DecodeEntry] = {}

    def add(self, req: SimRequest) -> None:
        req.status = Status.WAITING
        self.waiting.append(req)

    def remove(self, req: SimRequest) -> None:
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        self.kv.release(req.rid)
        self.last_entries.pop(req.rid, None)

    def preempt(self, req: SimRequest, batch: Batch) -> None:
        self.running.remove(req)
        self.kv.release(req.rid)
        req.status = Status.WAITING
        req.computed = 0
        req.preemptions += 1
        self.waiting.insert(0, req)
        batch.preempted.append(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, plan: protos.Plan | None, now: float) -> Batch:
        fresh = plan is not None and now <= plan.valid_until_s
        batch = Batch(plan_step=plan.step if fresh else -1)
        if fresh:
            self._apply_decisions(plan, batch)
            self.last_budget = max(1, plan.token_budget)
            for e in plan.decode:
                self.last_entries[e.rid] = e
        batch.token_budget = min(self.last_budget, self.limits.max_batch_tokens)
        self._schedule_decodes(plan if fresh else None, batch)
        self._schedule_prefills(plan if fresh else None, batch)
        return batch

    def _apply_decisions(self, plan: protos.Plan, batch: Batch) -> None:
        by_rid = {r.rid: r for r in self.waiting + self.running}
        for d in plan.decisions:
            req = by_rid.get(d.rid)
            if req is None:
                continue
            if d.decision == Decision.REJECT:
                batch.rejected.append(req)
                self.remove(req)
            elif d.decision == Decision.PREEMPT:
                if req.status is Status.RUNNING:
                    self.preempt(req, batch)
                req.decision = Decision.DEFER
            else:
                req.decision = Decision(d.decision)
                if req.decision == Decision.BEST_EFFORT and not req.slo.best_effort:
                    req.record.admitted = False  # demoted: a miss under SLOs-Serve's rule

    def _schedule_decodes(self, plan: protos.Plan | None, batch: Batch) -> None:
        decoding = [r for r in self.running if r.is_decoding]
        if plan is not None:
            entries = {e.rid: e for e in plan.decode}
            if plan.spec_depth >= 0:  # a batch-wide depth overrides the entries' depths
                entries = {rid: msgspec.structs.replace(e, depth=plan.spec_depth,
                                                        tree_cap=max(e.tree_cap, 1 + plan.spec_depth * e.width))
                           for rid, e in entries.items()}
            rank = {e.rid: i for i, e in enumerate(plan.decode)}
            decoding.sort(key=lambda r: (rank.get(r.rid, len(rank)), r.next_token_deadline_s()))
        else:
            entries = self.last_entries
            decoding.sort(key=lambda r: (r.is_best_effort, r.next_token_deadline_s()))
        left = batch.token_budget
        for req in decoding:
            if req.status is not Status.RUNNING:
                continue  # preempted for an earlier request of this batch
            if left < 1:
                break
            work = self._decode_work(req, entries.get(req.rid))
            work.tree_cap = min(work.tree_cap, left)
            if work.tree_cap <= 1:
                work.depth, work.width, work.tree_cap = 0, 1, 1
            if not self._reserve_decode(work, batch):
                continue
            batch.decodes.append(work)
            left -= 1

    def _decode_work(self, req: SimRequest, entry: protos.DecodeEntry | None) -> DecodeWork:
        lim = self.limits
        if entry is None:
            depth, width, cap, a = 0, 1, 1, 1.0
        else:
            depth, width, cap, a = entry.depth, entry.width, entry.tree_cap, entry.min_tokens
        depth = max(0, min(depth, lim.max_depth, req.max_new_tokens - req.decoded - 1))
        width = max(1, min(width, lim.max_width))
        cap = max(1, min(cap, 1 + depth * width))
        if depth == 0:
            width, cap = 1, 1
        return DecodeWork(req, depth=depth, width=width, tree_cap=cap, min_tokens=a)

    def _reserve_decode(self, work: DecodeWork, batch: Batch) -> bool:
        req = work.req
        while True:
            if self.kv.grow(req.rid, req.computed + work.tree_cap):
                return True
            if work.depth:
                work.depth, work.width, work.tree_cap = 0, 1, 1
                continue
            victim = self._victim(exclude={w.req for w in batch.decodes} | {req})
            if victim is None:
                if len(self.running) == 1:  # alone and still out of KV: it can never finish
                    batch.failed.append(req)
                    self.remove(req)
                else:
                    self.preempt(req, batch)
                return False
            self.preempt(victim, batch)

    def _victim(self, exclude: set) -> SimRequest | None:
        cands = [r for r in self.running if r not in exclude]
        if not cands:
            return None
        return max(cands, key=lambda r: (r.is_best_effort, r.next_token_deadline_s()))

    def _schedule_prefills(self, plan: protos.Plan | None, batch: Batch) -> None:
        left = batch.token_budget - sum(w.tree_cap for w in batch.decodes)
        if plan is not None:
            by_rid = {r.rid: r for r in self.waiting + self.running}
            wanted = [(by_rid[c.rid], c.tokens) for c in plan.prefill if c.rid in by_rid]
        else:
            wanted = [(r, r.prefill_remaining) for r in self._fallback_prefill_order()]
        scheduled = {w.req for w in batch.decodes}
        for req, tokens in wanted:
            if left < 1:
                break
            if req in scheduled or req.status is Status.DONE or (not req.is_prefilling and req.status is Status.RUNNING):
                continue
            if req.status is Status.WAITING:
                if len(self.running) >= self.limits.max_running:
                    continue
                # fallback admission watermark: the whole prompt plus one block must fit now
                # (an idle engine admits anyway: too big for the cache must fail, not wait)
                if plan is None and self.running and not self.kv.can_grow(
                        req.rid, req.prefill_target + self.kv.block_tokens):
                    continue
            n = min(tokens, req.prefill_remaining, left)
            if n < 1 or not self.kv.grow(req.rid, req.computed + n):
                continue
            if req.status is Status.WAITING:
                self.waiting.remove(req)
                self.running.append(req)
                req.status = Status.RUNNING
                if plan is not None and req.decision == Decision.DEFER:
                    req.decision = Decision.ADMIT
            batch.prefills.append((req, n))
            scheduled.add(req)
            left -= n

    def _fallback_prefill_order(self) -> list[SimRequest]:
        key = lambda r: (r.is_best_effort, r.ttft_deadline_s)  # noqa: E731
        running = sorted((r for r in self.running if r.is_prefilling), key=key)
        return running + sorted(self.waiting, key=key)
