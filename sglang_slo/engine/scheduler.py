"""Builds each iteration's batch: applies the planner's latest plan, or a local EDF policy.

One batch = prefill chunks + decoding requests with their speculation parameters, under a
token budget B (prefill tokens + verify tokens, roots included). The scheduler also owns
admission, KV reservation and preemption: before a request is put in the batch, the KV
slots its forward will write are reserved in both caches; when they cannot be, lower
priority running requests are preempted (KV freed, recomputed later) -- never a crash.

Torch-free and shared: the embedded engine drives it with `Request` + `BlockTables`, the
simulator (eval/simulator.py) with `SimRequest` + `KvBlocks` -- one set of batch rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from protos import messages as protos
from sglang_slo.engine.request import RequestStatus
from sglang_slo.engine.scheduler_interfaces import KvAccounting, SchedulableRequest

Decision = protos.Decision


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits and the local fallback policy's settings."""

    max_batch_tokens: int = 2048
    """Most tokens in one forward (prefill + verify)."""
    max_running: int = 64
    """Most requests holding KV at once."""
    max_depth: int = 8
    """Deepest draft tree the engine runs (0 = no draft model)."""
    max_width: int = 4
    """Widest beam per tree level."""
    fallback_budget: int = 512
    """Token budget B of the fallback policy before any plan arrived."""
    fallback_depth: int = 0
    """Draft depth of the fallback policy (for requests no plan ever covered)."""
    fallback_width: int = 1
    fallback_tree_cap: int = 1
    """Verify tokens per request (root included) of the fallback policy."""
    honour_arrival_tokens: bool = False
    """Prefill requests a fresh plan does not know (arrived after it was made) at once, whole,
    within its `arrival_tokens`, instead of waiting for a plan that lists them. The server
    turns it on; off here keeps the simulator (which shares this scheduler) as it was. Also
    widens the fallback's budget after a plan expired by that plan's allowance."""

    def __post_init__(self):
        if self.max_batch_tokens < 1 or self.max_running < 1 or self.fallback_budget < 1:
            raise ValueError("max_batch_tokens, max_running and fallback_budget must be >= 1")
        if self.max_depth < 0 or self.max_width < 1:
            raise ValueError("need max_depth >= 0 and max_width >= 1")


@dataclass
class PrefillWork:
    req: SchedulableRequest
    num_tokens: int
    """Tokens of `req.all_ids[req.num_computed:]` to prefill now."""


@dataclass
class DecodeWork:
    req: SchedulableRequest
    depth: int = 0
    """Draft depth (0 = plain decode of the root)."""
    width: int = 1
    tree_cap: int = 1
    """Most verify tokens (root included)."""
    min_tokens: float = 1.0
    """A_i: expected committed tokens wanted (AdaServe SLO step)."""


@dataclass
class ScheduledBatch:
    prefills: list[PrefillWork] = field(default_factory=list)
    decodes: list[DecodeWork] = field(default_factory=list)
    token_budget: int = 0
    """B: most prefill + verify tokens."""
    plan_step: int = -1
    """Step of the applied plan; -1 = fallback policy."""
    rejected: list[SchedulableRequest] = field(default_factory=list)
    """Requests the plan rejected (the engine finishes them)."""
    failed: list[tuple[SchedulableRequest, str]] = field(default_factory=list)
    """Requests that cannot run at all (e.g. need more KV than exists)."""
    preempted: list[SchedulableRequest] = field(default_factory=list)
    """Requests preempted while building this batch (KV freed, back to waiting)."""

    @property
    def num_prefill_tokens(self) -> int:
        return sum(p.num_tokens for p in self.prefills)

    @property
    def verify_budget(self) -> int:
        """Verify tokens available to decoding requests (roots included)."""
        return max(len(self.decodes), self.token_budget - self.num_prefill_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.prefills and not self.decodes


class Scheduler:
    """Waiting and running queues; `schedule()` returns the next batch."""

    def __init__(self, config: SchedulerConfig, kv: KvAccounting, max_context: int):
        """max_context: most tokens (prompt + output) a request may hold, tokens."""
        self.config = config
        self.kv = kv
        self.max_context = max_context
        self.waiting: list[SchedulableRequest] = []
        self.running: list[SchedulableRequest] = []
        self.last_budget = config.fallback_budget
        self.last_arrival_tokens = 0  # the last fresh plan's arrival allowance, tokens
        self.last_entries: dict[str, protos.DecodeEntry] = {}  # rid -> last planned spec params
        self.num_preemptions = 0
        self.num_arrivals_admitted = 0
        """Requests prefilled under a plan's arrival allowance (`_schedule_arrivals`)."""
        self._decided: protos.Plan | None = None  # plan whose admission decisions were applied
        self._arrivals_plan: protos.Plan | None = None  # plan whose arrival allowance was used
        self.num_schedules = 0
        """`schedule()` calls so far: the engine step the next batch runs as."""
        self._arrival_step: dict[str, int] = {}  # rid -> engine step its arrival was queued before

    # ---- queues ------------------------------------------------------------------------

    def add(self, req: SchedulableRequest) -> None:
        self.waiting.append(req)
        self._arrival_step[req.rid] = self.num_schedules

    def remove(self, req: SchedulableRequest) -> None:
        """Drop `req` from the queues and free its KV (finish or abort)."""
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        self.kv.release(req.rid)
        self.last_entries.pop(req.rid, None)
        self._arrival_step.pop(req.rid, None)

    def preempt(self, req: SchedulableRequest, batch: ScheduledBatch | None = None) -> None:
        """Free `req`'s KV and queue it for recomputation (noted in `batch.preempted`)."""
        self.running.remove(req)
        self.kv.release(req.rid)
        req.status = RequestStatus.WAITING
        req.num_computed = req.num_draft_computed = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.insert(0, req)
        if batch is not None:
            batch.preempted.append(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the batch ---------------------------------------------------------------------

    def schedule(self, plan: protos.Plan | None, now: float) -> ScheduledBatch:
        """The batch for this iteration. `plan` is used iff it is still valid at `now`.

        A plan with prefill chunks and no decode entries is a prefill-only iteration: the
        running requests do not decode in it (unless none of its chunks can run)."""
        self.num_schedules += 1
        fresh = plan is not None and now <= plan.valid_until_s
        batch = ScheduledBatch(plan_step=plan.step if fresh else -1)
        if fresh:
            if plan is not self._decided:  # decisions act once per plan, not on every step it covers
                self._apply_decisions(plan, batch)
                self._decided = plan
            self.last_budget = max(1, plan.token_budget)
            self.last_arrival_tokens = max(0, plan.arrival_tokens) if self.config.honour_arrival_tokens else 0
            for e in plan.decode:
                self.last_entries[e.rid] = e
            batch.token_budget = min(self.last_budget, self.config.max_batch_tokens)
        else:
            # The last plan's budget covered the work it planned; a request that arrives after
            # it expired gets the room it left for arrivals too (a policy with an exact covering
            # budget would otherwise feed the newcomer's prompt through a few tokens per iteration).
            batch.token_budget = min(self.last_budget + self.last_arrival_tokens, self.config.max_batch_tokens)
        if fresh and plan.prefill and not plan.decode:
            # A prefill-only plan (SGLang's default prefill-first, non-mixed iteration):
            # running requests wait while its chunks run; if none of them can run (already
            # done, no KV), the iteration decodes instead of idling.
            self._schedule_prefills(plan, batch, now)
            if not batch.prefills:
                self._schedule_decodes(plan, batch, now)
            else:
                self._schedule_arrivals(plan, batch)
            return batch
        self._schedule_decodes(plan if fresh else None, batch, now)
        self._schedule_prefills(plan if fresh else None, batch, now)
        if fresh:
            self._schedule_arrivals(plan, batch)
        return batch

    def _apply_decisions(self, plan: protos.Plan, batch: ScheduledBatch) -> None:
        by_rid = {r.rid: r for r in self.waiting + self.running}
        for d in plan.decisions:
            req = by_rid.get(d.rid)
            if req is None:
                continue
            if d.decision == Decision.REJECT:
                batch.rejected.append(req)
                self.remove(req)
                continue
            if d.decision == Decision.PREEMPT:
                if req.status is RequestStatus.RUNNING:
                    self.preempt(req, batch)
                req.decision = Decision.DEFER  # back to waiting, to be admitted again
                continue
            req.decision = d.decision

    def _schedule_decodes(self, plan: protos.Plan | None, batch: ScheduledBatch, now: float) -> None:
        decoding = [r for r in self.running if r.is_decoding]
        if plan is not None:  # planned order first, then any running request it left out (EDF)
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
            if req.status is not RequestStatus.RUNNING:
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
            left -= 1  # the root is certain; the tree fill shares the rest of B

    def _decode_work(self, req: SchedulableRequest, entry: protos.DecodeEntry | None) -> DecodeWork:
        c = self.config
        if entry is None:
            depth, width, cap, a = c.fallback_depth, c.fallback_width, c.fallback_tree_cap, 1.0
        else:
            depth, width, cap, a = entry.depth, entry.width, entry.tree_cap, entry.min_tokens
        depth = max(0, min(depth, c.max_depth))
        width = max(1, min(width, c.max_width))
        # Never verify past the context length or the request's remaining output.
        room = min(self.max_context - req.num_tokens, req.max_new_tokens - req.num_output_tokens)
        depth = max(0, min(depth, room - 1))
        cap = max(1, min(cap, 1 + depth * width))
        if depth == 0:
            width, cap = 1, 1
        return DecodeWork(req, depth=depth, width=width, tree_cap=cap, min_tokens=a)

    def _reserve_decode(self, work: DecodeWork, batch: ScheduledBatch) -> bool:
        """Reserve KV for the root + tree in the target and the drafted nodes in the draft."""
        req = work.req
        while True:
            target = req.num_computed + work.tree_cap
            draft = req.num_tokens + max(0, work.depth - 1) * work.width if work.depth else 0
            if self.kv.grow(req.rid, target, draft):
                return True
            if work.depth:  # first shrink to a plain decode
                work.depth, work.width, work.tree_cap = 0, 1, 1
                continue
            victim = self._victim(exclude={w.req for w in batch.decodes} | {req})
            if victim is None:
                if len(self.running) == 1:  # alone and still out of KV: it can never finish
                    batch.failed.append((req, "KV cache exhausted: request longer than the cache"))
                    self.remove(req)
                else:
                    self.preempt(req, batch)
                return False
            self.preempt(victim, batch)

    def _victim(self, exclude: set) -> SchedulableRequest | None:
        """Running request to preempt: best-effort first, then the latest deadline."""
        cands = [r for r in self.running if r not in exclude]
        if not cands:
            return None
        return max(cands, key=lambda r: (r.is_best_effort, r.next_token_deadline_s()))

    def _schedule_prefills(self, plan: protos.Plan | None, batch: ScheduledBatch, now: float) -> None:
        # Decodes keep their speculation: prefill gets what their tree caps leave of B.
        left = batch.token_budget - sum(w.tree_cap for w in batch.decodes)
        if plan is not None:
            by_rid = {r.rid: r for r in self.waiting + self.running}
            wanted = [(by_rid[c.rid], c.tokens) for c in plan.prefill if c.rid in by_rid]
        else:
            wanted = [(r, r.num_prefill_remaining) for r in self._fallback_prefill_order()]
        scheduled = {w.req for w in batch.decodes}
        for req, tokens in wanted:
            if left < 1:
                break
            if req in scheduled or req.is_finished or not req.is_prefilling and req.status is RequestStatus.RUNNING:
                continue
            if req.status is RequestStatus.WAITING:
                if len(self.running) >= self.config.max_running:
                    continue
                # Fallback admission keeps a watermark: the whole prompt plus one block must
                # fit now, so admitted requests rarely need preempting later (an idle engine
                # admits anyway: a request too big for the cache must fail, not wait forever).
                if plan is None and self.running and not self.kv.can_grow(
                        req.rid, req.prefill_target + self.kv.block_size):
                    continue
            n = min(tokens, req.num_prefill_remaining, left)
            # The draft cache (if any) prefills the same chunk.
            if n < 1 or not self.kv.grow(req.rid, req.num_computed + n, req.num_computed + n):
                continue  # no KV now: the request waits (preemption is for decodes)
            if req.status is RequestStatus.WAITING:
                self.waiting.remove(req)
                self.running.append(req)
                req.status = RequestStatus.RUNNING
                if plan is not None and req.decision == Decision.DEFER:
                    req.decision = Decision.ADMIT
            batch.prefills.append(PrefillWork(req, n))
            scheduled.add(req)
            left -= n

    def _schedule_arrivals(self, plan: protos.Plan, batch: ScheduledBatch) -> None:
        """Requests `plan` does not know (queued after the report it was based on, and not
        in it) prefill now, whole prompts in EDF order, within `plan.arrival_tokens` on top of
        the plan's own budget: without this they wait for a plan that lists them, two or more
        iterations away (the plan for step k+2 is made from report k). The allowance is one
        prefill's worth per plan, as the SGLang plugin uses it (the planner priced one stall of
        the decoders)."""
        if (not self.config.honour_arrival_tokens or plan.arrival_tokens <= 0
                or plan is self._arrivals_plan):
            return
        fresh = [r for r in self.waiting
                 if self._arrival_step.get(r.rid, -1) > plan.based_on_step
                 and r.num_computed == 0 and not r.num_preemptions]
        if not fresh:  # the common iteration: no set of the plan's rids to build
            return
        known = {c.rid for c in plan.prefill} | {e.rid for e in plan.decode} | {d.rid for d in plan.decisions}
        fresh = [r for r in fresh if r.rid not in known]
        left = min(plan.arrival_tokens,  # tokens, and the forward's limit
                   self.config.max_batch_tokens - batch.num_prefill_tokens - sum(w.tree_cap for w in batch.decodes))
        for req in sorted(fresh, key=lambda r: (r.is_best_effort, r.ttft_deadline_s)):
            n = req.num_prefill_remaining
            if n > left or len(self.running) >= self.config.max_running:
                continue
            if not self.kv.can_grow(req.rid, req.prefill_target + self.kv.block_size):
                continue  # the fallback's watermark: the arrival must not cause preemptions
            if not self.kv.grow(req.rid, n, n):
                continue
            self.waiting.remove(req)
            self.running.append(req)
            req.status = RequestStatus.RUNNING
            req.decision = Decision.ADMIT
            batch.prefills.append(PrefillWork(req, n))
            batch.token_budget += n
            left -= n
            self._arrivals_plan = plan
            self.num_arrivals_admitted += 1

    def _fallback_prefill_order(self) -> list[SchedulableRequest]:
        """Running prefills first, then waiting requests, each by TTFT deadline (EDF);
        best-effort last."""
        key = lambda r: (r.is_best_effort, r.ttft_deadline_s)  # noqa: E731
        running = sorted((r for r in self.running if r.is_prefilling), key=key)
        return running + sorted(self.waiting, key=key)
