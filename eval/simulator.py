"""Iteration-level discrete-event simulator of one engine on a hardware profile.

Each iteration reads like the engine's: schedule (the engine's own Scheduler: apply the plan, or the EDF fallback) ->
run (time from the profile's cost model, the truth, on the actual batch; speculation:
per-request candidate trees, node selection by `sglang_slo.spec.select.select_trees` exactly
as the real engine does it, acceptance sampled from each request's true alphas) ->
postprocess (commit tokens, free KV, finish requests, release closed-loop successors) ->
report to the planner and take its next plan. Simulated time does not advance while the
planner plans, so the in-process and the over-ZMQ planner give the same run.

Deterministic for a seed: one `random.Random` drives trees and acceptance.
"""

from __future__ import annotations

import heapq
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from eval.draft_tree import build_tree, verify
from eval.kv_blocks import KvBlocks
from eval.metrics import Outcome, RequestRecord
from eval.planner_link import InProcessLink, ZmqLink
from eval.sim_request import SimRequest, Status
from eval.sim_scheduler import Batch, SchedulerLimits, SimScheduler
from eval.workloads import Workload
from protos import messages as protos
from sglang_slo.spec.select import SLO_ORDERS, select_trees
from sidecar.cost_model import HardwareProfile, load_profile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimConfig:
    """Knobs of the simulated engine (the hardware itself comes from the profile)."""

    max_running: int = 512
    """Most requests holding KV at once."""
    fallback_budget: int = 512
    """Token budget of the local fallback policy before any plan arrived."""
    calibration_sigma: float = 0.05
    """Sd of the draft's probability estimates around the true acceptance."""
    slo_order: str = "fewest_tokens"
    """`select_trees` SLO-step order (sglang_slo.spec.select.SLO_ORDERS)."""
    prefix_cache: bool = True
    """Keep a finished agent call's KV for the session's next call (evictable)."""
    drain_s: float = 300.0
    """Simulate at most this long after the arrival window ends; the rest is unfinished."""
    idle_tick_s: float = 0.005
    """When nothing can run (all deferred), ask the planner again after this long, seconds;
    doubled on every further idle tick in a row, up to `max_idle_tick_s`."""
    max_idle_tick_s: float = 0.1
    check_kv: bool = False
    """Check the KV block invariant every iteration (tests)."""
    time_noise_sigma: float = 0.0
    """Sd of a log-normal factor on every iteration's time (0 = the cost model exactly)."""
    mixed_forward: bool = True
    """Prefill chunks and decodes may share a forward (SGLang with `--enable-mixed-chunk`).
    False: SGLang's default, told to the planner in the hello; a forward with any prefill
    chunk runs prefill only and that iteration's decodes wait for the next."""

    def __post_init__(self):
        if self.slo_order not in SLO_ORDERS:
            raise ValueError(f"slo_order must be one of {SLO_ORDERS}")
        if self.max_running < 1 or self.fallback_budget < 1 or self.idle_tick_s <= 0 or self.drain_s < 0:
            raise ValueError("max_running, fallback_budget >= 1; idle_tick_s > 0; drain_s >= 0")
        if self.time_noise_sigma < 0 or self.calibration_sigma < 0:
            raise ValueError("time_noise_sigma and calibration_sigma must be >= 0")


@dataclass
class SimResult:
    policy: str
    records: list[RequestRecord]
    elapsed_s: float
    """Simulated seconds from 0 to the last event."""
    window_s: float = 0.0
    """The workload's arrival window, seconds (the goodput denominator)."""
    stats: dict = field(default_factory=dict)


class Simulator:
    def __init__(self, workload: Workload, hardware: str | Path, policy: str | None = "fcfs", *,
                 seed: int = 0, config: SimConfig = SimConfig(), over_zmq: bool = False,
                 policy_overrides: dict | None = None):
        """policy: a planner policy name, or None for the engine's local fallback only."""
        self.profile: HardwareProfile = load_profile(hardware)
        self.truth = self.profile.cost  # this instance is never refit: it is the hardware
        self.config, self.policy, self.workload = config, policy, workload
        lim = self.profile.engine
        self.kv = KvBlocks(lim.kv_capacity_tokens, lim.kv_block_tokens, on_claim_lost=self._prefix_lost)
        self.sched = SimScheduler(SchedulerLimits(
            max_batch_tokens=lim.max_batch_tokens, max_running=config.max_running, max_depth=lim.max_depth,
            max_width=lim.max_width, fallback_budget=config.fallback_budget), self.kv)
        self.rng = random.Random(seed * 1_000_003 + 17)
        self.hello = protos.EngineHello(
            protocol_version=protos.PROTOCOL_VERSION, engine="sim",
            spec_modes=[protos.SpecMode.TREE, protos.SpecMode.CHAIN, protos.SpecMode.NONE],
            max_batch_tokens=lim.max_batch_tokens, kv_capacity_tokens=lim.kv_capacity_tokens,
            max_depth=lim.max_depth, max_width=lim.max_width, depth_tiers=list(lim.depth_tiers),
            kv_block_tokens=lim.kv_block_tokens, config_hash=f"sim:{self.profile.name}",
            mixed_forward=config.mixed_forward)
        self._build_requests()  # before the planner starts: bad input must not leak a sidecar
        self.link = None
        if policy is not None:
            if over_zmq:
                self.link = ZmqLink(policy, hardware, self.hello, overrides=policy_overrides)
            else:
                self.link = InProcessLink(policy, hardware, **(policy_overrides or {}))
                self.link.send(self.hello)
        self.warm_prefixes: set[str] = set()  # app-wide prefixes some request has prefilled
        self.now = 0.0
        self.step = 0
        self.plan: protos.Plan | None = None
        self._held: protos.Plan | None = None  # answer to the last report, applied after the next step
        self._stale: dict[str, SimRequest] = {}  # preempted or planned-but-not-run since the last report
        self._demotions_noted: protos.Plan | None = None  # last plan whose demotions were recorded
        self.stats = dict(iterations=0, mixed_iterations=0, plan_iterations=0, fallback_iterations=0, idle_ticks=0,
                          preemptions=0, prefix_hits=0, prefix_tokens_reused=0, verified=0,
                          accepted=0, spec_verifies=0, busy_s=0.0, peak_kv_frac=0.0)

    # ---- requests ------------------------------------------------------------------------

    def _build_requests(self) -> None:
        self.reqs: dict[str, SimRequest] = {}
        self.pending: list[tuple[float, int, str]] = []  # (arrival time, seq, rid): a heap
        for seq, g in enumerate(self.workload.requests):
            rec = RequestRecord(rid=g.rid, slo=g.slo, arrival_s=g.arrival_s, prompt_tokens=g.prompt_tokens,
                                session_id=g.session_id, stage_starts=[0])
            r = SimRequest(gen=g, record=rec)
            self.reqs[g.rid] = r
            if g.after_rid:
                if g.after_rid not in self.reqs:
                    raise ValueError(f"{g.rid}: depends on {g.after_rid!r}, which does not come before it")
                self.reqs[g.after_rid].dependents.append(r)
            else:
                heapq.heappush(self.pending, (g.arrival_s, seq, g.rid))
        self._seq = len(self.workload.requests)
        self.end_limit = max([g.arrival_s for g in self.workload.requests] + [self.workload.duration_s]) + self.config.drain_s

    def _release_arrivals(self) -> None:
        while self.pending and self.pending[0][0] <= self.now:
            t, _, rid = heapq.heappop(self.pending)
            r = self.reqs[rid]
            r.arrival_s = r.record.arrival_s = t
            if self.config.prefix_cache and r.gen.prefix_tokens:
                r.cached_prefix = r.num_computed = self._cached_prefix(r)
            self.sched.add(r)
            if self.link:
                self.link.send(r.arrived_message())

    def _cached_prefix(self, r: SimRequest) -> int:
        """Prompt tokens `r` expects to find in the prefix cache; none of its KV is held yet.

        A session's previous context (parked by its previous call) is reserved, not pinned:
        while `r` waits it stays evictable, and `r` reuses it only if it is still resident
        when the scheduler admits `r` (its first KV grow pins it; see `KvBlocks.reserve`),
        else `_prefix_lost` makes `r` prefill everything. An app-wide shared prefix (system
        prompt + tool schemas), once some request prefilled it, is reused without compute,
        but every user is charged its own blocks on admission (the simulator has no shared
        blocks: conservative on memory)."""
        want = min(r.gen.prefix_tokens, r.gen.prompt_tokens - 1)  # >= 1 token left to prefill
        if r.gen.shared_prefix:
            if r.gen.shared_prefix in self.warm_prefixes:
                self.stats["prefix_hits"] += 1
                self.stats["prefix_tokens_reused"] += want
                return want
            return 0
        return self.kv.reserve(r.gen.session_id, r.rid, want) if r.gen.session_id else 0

    def _prefix_lost(self, rid: str) -> None:
        """`rid`'s reserved session prefix was evicted while it waited: full prefill, and
        the planner hears its prefilled count went back to 0."""
        r = self.reqs[rid]
        r.num_computed = r.cached_prefix = 0
        self._stale[rid] = r

    def _finish(self, r: SimRequest, outcome: Outcome, reason: protos.FinishReason, msgs: list) -> None:
        """Free KV (or park it for the session's next call), record, release or cancel successors."""
        if outcome is Outcome.FINISHED and r.dependents and self.config.prefix_cache:
            self.sched.running.remove(r)
            self.kv.park(r.rid, r.gen.session_id, r.num_computed)
            self.sched.last_entries.pop(r.rid, None)
        else:
            self.sched.remove(r)
        r.finish(outcome)
        msgs.append(protos.RequestFinished(rid=r.rid, reason=reason, decoded=r.decoded, finish_s=self.now))
        for d in r.dependents:
            if outcome is Outcome.FINISHED:
                heapq.heappush(self.pending, (self.now + d.gen.delay_s, self._seq, d.rid))
                self._seq += 1
            else:
                self._cancel(d)

    def _cancel(self, r: SimRequest) -> None:
        r.finish(Outcome.CANCELLED)
        for d in r.dependents:
            self._cancel(d)

    # ---- the loop ------------------------------------------------------------------------

    def run(self) -> SimResult:
        """Simulate until every request finished (or `drain_s` after the arrival window).

        Plan timing mirrors a pipelined engine: the plan the planner returns for report k
        (meant for step k + 2) arrives while step k + 1 runs, so it is applied after step
        k + 1. From idle the engine sends an idle report s and applies its plan at once;
        its next step is numbered s + 2 (nothing is in flight)."""
        wall = time.perf_counter()
        idle = True  # no forward ran last time round: ask for a fresh plan first
        tick = self.config.idle_tick_s
        try:
            while True:
                self._release_arrivals()
                if not self.sched.has_work:
                    if not self.pending:
                        break
                    self.now = max(self.now, self.pending[0][0])
                    idle = True
                    continue
                if self.now > self.end_limit:
                    break
                if idle and self.link:
                    self._apply(self._held)
                    self._apply(self._report(self.now, self.now, [], Batch(), idle=True))
                    self._held = None
                msgs: list = []
                batch = self.sched.schedule(self.plan, self.now)
                if not self.config.mixed_forward and batch.prefills:
                    batch.decodes = []  # they stay running; _note_stale reports them unrun
                for r in batch.rejected:
                    self._finish(r, Outcome.REJECTED, protos.FinishReason.REJECTED, msgs)
                for r, _ in batch.failed:
                    self._finish(r, Outcome.FAILED, protos.FinishReason.ERROR, msgs)
                if batch.plan_step >= 0 and self.plan is not self._demotions_noted:
                    self._note_demotions(self.plan)
                self.stats["preemptions"] += len(batch.preempted)
                self._note_stale(batch)
                if batch.is_empty:
                    self._send(msgs)
                    nxt = self.pending[0][0] if self.pending else float("inf")
                    self.now = min(nxt, self.now + tick)
                    tick = min(2 * tick, self.config.max_idle_tick_s)
                    self.stats["idle_ticks"] += 1
                    idle = True
                    continue
                idle, tick = False, self.config.idle_tick_s
                start = self.now
                progress = self._run_batch(batch, msgs)
                self._send(msgs)
                if self.config.check_kv:
                    self.kv.check()
                if self.link:
                    self._apply(self._held)
                    self._held = self._report(start, self.now, progress, batch)
                else:
                    self.step += 1
                    self._stale.clear()
        finally:
            if self.link:
                self.link.close()
        return self._result(time.perf_counter() - wall)

    def _note_demotions(self, plan: protos.Plan) -> None:
        """A request the plan demoted to best effort is a miss under SLOs-Serve's rule."""
        self._demotions_noted = plan
        for d in plan.decisions:
            r = self.reqs.get(d.rid)
            if (d.decision == protos.Decision.BEST_EFFORT and r is not None
                    and r.decision == protos.Decision.BEST_EFFORT and not r.slo.best_effort):
                r.record.admitted = False

    def _note_stale(self, batch: Batch) -> None:
        """Remember requests whose state the planner may have wrong after this batch:
        preempted ones (KV gone) and ones the applied plan scheduled that did not run (the
        planner counted its chunks as done). Their facts go out with the next report."""
        for r in batch.preempted:
            self._stale[r.rid] = r
        if batch.plan_step >= 0 and self.plan is not None:
            ran = {p.req.rid for p in batch.prefills} | {w.req.rid for w in batch.decodes}
            for rid in [c.rid for c in self.plan.prefill] + [e.rid for e in self.plan.decode]:
                r = self.reqs.get(rid)
                if rid not in ran and r is not None and r.status is not Status.FINISHED:
                    self._stale[rid] = r

    def _apply(self, plan: protos.Plan | None) -> None:
        """Keep the newest plan (the engine's rule); the scheduler uses it while valid."""
        if plan is not None and (self.plan is None or plan.step >= self.plan.step):
            self.plan = plan

    def _send(self, msgs: list) -> None:
        if self.link:
            for m in msgs:
                self.link.send(m)

    def _report(self, start: float, end: float, progress: list, batch: Batch, idle: bool = False) -> protos.Plan | None:
        """Send IterationReport `self.step` (an idle report when nothing ran); return the plan."""
        reported = {p.rid for p in progress}
        for rid, r in self._stale.items():  # facts replace the planner's projections
            if rid not in reported and r.status is not Status.FINISHED:
                progress.append(self._progress(r, 0, 0, 0, 0, 0.0))
        self._stale.clear()
        if idle:  # nothing is in flight: no plan received so far may count as running
            top = max((p.step for p in (self.plan, self._held) if p is not None), default=-1)
            self.step = max(self.step, top)
        rep = protos.IterationReport(
            step=self.step, start_s=start, end_s=end, plan_step=batch.plan_step,
            prefill_tokens=batch.num_prefill_tokens, verify_tokens=self._last_verify if progress and end > start else 0,
            draft_steps=self._last_draft_steps if end > start else 0, context_tokens=self._last_context if end > start else 0,
            kv_free_tokens=self.kv.free_tokens, progress=progress, waiting=len(self.sched.waiting),
            forward_s=end - start)
        self.step += 2 if idle else 1
        return self.link.plan_after(rep)

    _last_verify = _last_draft_steps = _last_context = 0

    def _progress(self, r: SimRequest, prefill_tokens: int, verified: int, accepted: int, depth: int,
                  conf: float) -> protos.RequestProgress:
        return protos.RequestProgress(
            rid=r.rid, prefilled=min(r.num_computed, r.gen.prompt_tokens), decoded=r.decoded,
            prefill_tokens=prefill_tokens, verified=verified, accepted=accepted, depth=depth,
            draft_conf=conf, stage=r.stage, first_token_s=r.first_token_s)

    def _run_batch(self, batch: Batch, msgs: list) -> list[protos.RequestProgress]:
        """Execute one forward: time it, commit its tokens; returns the per-request progress."""
        cfg = self.config
        # --- speculation: candidate trees, selection (as the engine), verification ---
        trees = [build_tree(w.req.gen.alphas, w.depth, w.width, w.min_tokens, w.tree_cap,
                            cfg.calibration_sigma, self.rng) for w in batch.decodes]
        selection = select_trees([t.cand for t in trees], batch.verify_budget, cfg.slo_order) if trees else None
        verify_tokens = selection.total_tokens if selection else 0
        draft_steps = max((w.depth for w in batch.decodes), default=0)
        draft_tokens = sum(1 + (w.depth - 1) * w.width for w in batch.decodes if w.depth)
        context = sum(w.req.num_computed + 1 for w in batch.decodes) + sum(p.req.num_computed + p.num_tokens for p in batch.prefills)
        dt = self.truth.iteration_time(batch.num_prefill_tokens, verify_tokens, draft_steps, context, draft_tokens)
        if cfg.time_noise_sigma:
            dt *= self.rng.lognormvariate(0.0, cfg.time_noise_sigma)
        self.now += dt
        self._last_verify, self._last_draft_steps, self._last_context = verify_tokens, draft_steps, context
        st = self.stats
        st["iterations"] += 1
        st["mixed_iterations"] += bool(batch.prefills and batch.decodes)
        st["plan_iterations" if batch.plan_step >= 0 else "fallback_iterations"] += 1
        st["busy_s"] += dt
        st["peak_kv_frac"] = max(st["peak_kv_frac"], 1 - self.kv.free_blocks / self.kv.total_blocks)
        progress: list[protos.RequestProgress] = []
        # --- prefill chunks ---
        for p in batch.prefills:
            r, n = p.req, p.num_tokens
            r.num_computed += n
            if r.gen.shared_prefix and r.num_computed >= r.gen.prefix_tokens:
                self.warm_prefixes.add(r.gen.shared_prefix)
            if not r.is_prefilling and r.decoded == 0:  # the prefill's last forward samples token 1
                self._emit(r, 1)
            progress.append(self._progress(r, n, 0, 0, 0, 0.0))
        # --- decodes ---
        for i, w in enumerate(batch.decodes):
            r = w.req
            nodes = selection.nodes[i]
            accepted, depth, conf = verify(trees[i], nodes, r.gen.alphas, self.rng) if len(nodes) > 1 else (0, 0, 0.0)
            n = min(accepted + 1, r.gen.output_tokens - r.decoded)
            self._emit(r, n)
            r.num_computed = r.gen.prompt_tokens + r.decoded - 1
            self.kv.shrink(r.rid, r.num_computed)
            st["verified"] += len(nodes) - 1
            st["accepted"] += accepted
            st["spec_verifies"] += len(nodes) > 1
            progress.append(self._progress(r, 0, len(nodes) - 1, accepted, depth, conf))
        # --- finished requests (after all progress is recorded) ---
        done = [p for p in progress if self.reqs[p.rid].decoded >= self.reqs[p.rid].gen.output_tokens]
        for p in done:
            r = self.reqs[p.rid]
            reason = protos.FinishReason.LENGTH if r.decoded >= r.max_new_tokens else protos.FinishReason.STOP
            self._finish(r, Outcome.FINISHED, reason, msgs)
        return [p for p in progress if self.reqs[p.rid].status is not Status.FINISHED]

    def _emit(self, r: SimRequest, n: int) -> None:
        """Commit n output tokens at the current time (end of the iteration)."""
        if n <= 0:
            return
        if r.decoded == 0:
            r.first_token_s = self.now
        r.record.token_times.extend([self.now] * n)
        r.decoded += n
        stages = r.gen.stage_tokens
        while r.stage + 1 < len(stages) and r.decoded >= sum(stages[: r.stage + 1]):
            r.stage += 1
            r.record.stage_starts.append(sum(stages[: r.stage]))

    def _result(self, wall_s: float) -> SimResult:
        for r in self.reqs.values():
            if r.status is not Status.FINISHED:  # queued, running, or not arrived yet
                self.sched.remove(r)
                r.finish(Outcome.UNFINISHED)
        self.kv.drop_parked()
        self.kv.check()
        if self.kv.free_blocks != self.kv.total_blocks:
            raise AssertionError("KV blocks leaked at the end of the run")
        st = self.stats
        st["wall_s"] = wall_s
        st["plan_latency_s_total"] = self.link.plan_latency_s if self.link else 0.0
        st["plan_failures"] = self.link.plan_failures if self.link else 0
        st["mean_accepted_per_verify"] = st["accepted"] / st["spec_verifies"] if st["spec_verifies"] else 0.0
        st["kv_evictions"] = self.kv.evictions
        st["prefix_hits"] += self.kv.claims_pinned  # session prefixes still resident on admission
        st["prefix_tokens_reused"] += self.kv.claim_tokens_pinned
        st["prefix_evicted_while_waiting"] = self.kv.claims_lost
        st["utilization"] = st["busy_s"] / self.now if self.now > 0 else 0.0
        return SimResult(policy=self.policy or "fallback", records=[r.record for r in self.reqs.values()],
                         elapsed_s=self.now, window_s=self.workload.duration_s, stats=st)


def simulate(workload: Workload, hardware: str | Path, policy: str | None = "fcfs", **kw) -> SimResult:
    """Run one workload under one policy (see `Simulator`)."""
    return Simulator(workload, hardware, policy, **kw).run()
