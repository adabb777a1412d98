"""Per-scheduler-process plugin state: the plan in force, and (rank 0) the planner link.

One `SloSchedulerState` per SGLang `Scheduler` (one scheduler per process), created by the
`init_request_dispatcher` hook and stored as `scheduler.slo_state`. Everything that changes
batch composition reads `self.plan`, which only changes through `apply_update` -- the handler
SGLang's dispatcher calls on every rank for the `PlannerUpdate` rank 0 broadcast.

Engine clock: `time.monotonic()` seconds (the clock of SGLang's `batch.launch_ts`).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from http import HTTPStatus

import msgspec

from protos.messages import (
    PROTOCOL_VERSION,
    Decision,
    EngineHello,
    FinishReason,
    RequestArrived,
    RequestFinished,
    RequestSnapshot,
    Resync,
    SpecMode,
)

from sglang_slo.sglang_plugin.iteration_report import (
    build_report, decoders_in_mixed, finish_reason_of, note_first_tokens,
)
from sglang_slo.sglang_plugin.plan_state import PlannerUpdate, PlanState, PlanView
from sglang_slo.sglang_plugin.planner_link import PlannerLink
from sglang_slo.sglang_plugin.request_slo import attach_slo, load_catalog, req_slo

log = logging.getLogger(__name__)

PLANNER_ENV = "SGLANG_SLO_PLANNER"  # planner endpoint (ipc://... or tcp://...); unset = no planner
EDF_ENV = "SGLANG_SLO_EDF_FALLBACK"  # "1": order the queue by deadline when no plan rules
REPORT_LOG_ENV = "SGLANG_SLO_REPORT_LOG"  # path: append one JSON line per iteration (evidence, tests)
SWEEP_S = 0.5  # seconds between scans for requests that left without a batch result
_LOG_LINE = msgspec.json.Encoder()  # iteration log lines (~10x cheaper than json.dumps)

_current: SloSchedulerState | None = None


def is_leader() -> bool:
    """TP/PP/CP rank 0 of this scheduler group: the rank that reads sockets and talks to the planner."""
    from sglang.srt.runtime_context import get_parallel

    p = get_parallel()
    return p.pp_rank == 0 and p.attn_tp_rank == 0 and p.attn_cp_rank == 0


def current_state() -> SloSchedulerState | None:
    """The state of this process's scheduler (None outside a scheduler process)."""
    return _current


def current_plan():
    """The `PlanView` in force in this process, or None (used by the speculation policy)."""
    return _current.plan.view if _current is not None else None


class SloSchedulerState:
    """Plan, request tracking and planner I/O of one scheduler."""

    def __init__(self, scheduler, endpoint: str | None = None, clock=time.monotonic):
        global _current
        self.scheduler = scheduler
        self.clock = clock
        self.plan = PlanState()
        self.catalog = load_catalog()
        self.endpoint = endpoint if endpoint is not None else os.environ.get(PLANNER_ENV) or None
        self.edf_fallback = os.environ.get(EDF_ENV, "0") == "1"
        self.link: PlannerLink | None = None  # rank 0 only, created on the first poll
        self.step = 0  # engine iteration counter (IterationReport.step)
        self.tracked: dict[str, object] = {}  # rank 0: rid -> Req the planner knows about
        self._arrivals: list = []  # rank 0: Reqs to announce on the next poll
        self._is_leader: bool | None = None  # resolved on first use (the rank is known by then)
        self._tp_size: int | None = None
        self.shared_now_s: float | None = None  # rank 0's clock, from the last broadcast (TP > 1)
        self._unanchored: list = []  # TP > 1: Reqs received this pass, anchored on this pass's clock
        self._valid_until_s = float("inf")  # rank 0: expiry of the plan in force
        self._expire_sent = True
        self._last_sweep_s = 0.0
        # forward_iter -> (plan, draft depth, why no plan built it)
        self.plan_of_launch: dict[int, tuple[PlanView | None, int, str | None]] = {}
        self.building_plan: PlanView | None = None  # plan the next batch is built under (None: SGLang's rules)
        self.fallback: str | None = None  # why the batch being built has no plan: no_plan / expired / idle
        self.last_launch_s = 0.0  # launch time of the newest batch (engine clock)
        self._report_log = _open_log(os.environ.get(REPORT_LOG_ENV))
        self.reports_sent = 0
        self.rejected = 0
        _current = self

    # ---------------------------------------------------------------- all ranks

    def on_new_request(self, req) -> None:
        """Attach `req.slo`; an invalid SLO aborts the request with the parser's message."""
        sched = self.scheduler
        err = attach_slo(req, self.catalog, self._arrival_clock(), set_priority=bool(getattr(sched, "enable_priority_scheduling", False)))
        if err is not None:
            req.set_finish_with_abort(err, status_code=HTTPStatus.BAD_REQUEST)
            return
        if self.tp_size() > 1:
            self._unanchored.append(req)
        if self.endpoint is not None and self.leader():
            self._arrivals.append(req)  # announced by the next poll (max_new_tokens is set by then)

    def _arrival_clock(self) -> float:
        """Arrival stamp: this rank's clock with TP = 1, else rank 0's last broadcast clock.

        With TP > 1 that stamp is provisional: rank 0's clock of the pass that received the
        request rides the same broadcast, after the requests (SGLang appends rank 0's local
        list to the pulled ones), and `apply_update` re-anchors this pass's arrivals on it.
        The last broadcast clock alone is one loop pass old, i.e. from before the previous
        forward (8-53 ms early on the CPU TP=2 test server).
        """
        if self.tp_size() > 1 and self.shared_now_s is not None:
            return self.shared_now_s
        return self.clock()

    def tp_size(self) -> int:
        """Tensor-parallel group size (cached; 1 when SGLang's parallel context is not set)."""
        if self._tp_size is None:
            from sglang.srt.runtime_context import get_parallel

            try:
                self._tp_size = int(get_parallel().tp_size)
            except (RuntimeError, ValueError, AttributeError):
                self._tp_size = 1
        return self._tp_size

    def leader(self) -> bool:
        """Whether this scheduler is its group's rank 0 (cached)."""
        if self._is_leader is None:
            self._is_leader = is_leader()
        return self._is_leader

    def apply_update(self, update: PlannerUpdate) -> None:
        """Dispatcher handler (every rank, same order): install/expire the plan, apply shedding."""
        if update.now_s is not None:
            self.shared_now_s = update.now_s
            for req in self._unanchored:  # received in this pass: rank 0 polled just before the pull
                req_slo(req).arrival_s = update.now_s
            self._unanchored.clear()
        self.plan.apply(update)
        if update.plan is not None:
            self._shed(update.plan.decisions)
        return None

    def _shed(self, decisions) -> None:
        """BEST_EFFORT/PREEMPT: lowest SGLang priority, so priority retraction/preemption drop them first."""
        sched = self.scheduler
        if not decisions or not getattr(sched, "enable_priority_scheduling", False):
            return
        lowest = sys.maxsize if getattr(sched, "schedule_low_priority_values_first", False) else -sys.maxsize - 1
        shed = {d.rid for d in decisions if d.decision in (Decision.BEST_EFFORT, Decision.PREEMPT)}
        for req in self._live_reqs():
            if req.rid in shed:
                req.priority = lowest

    def should_defer_prefill(self, original, running_batch) -> bool:
        """The plan's prefill-or-decode choice; SGLang's own rule when no plan rules.

        Decides, once per batch build, which plan the build follows (`building_plan`; the
        prefill adder and the queue order read `plan_for_build()`). A plan with no chunks left
        while nothing runs would idle the engine: nothing to decode, and requests it does not
        know of (they arrived after it was made) may not prefill. That build follows SGLang's
        rules instead.
        """
        view = self.plan.view
        if view is None:
            self.fallback = "expired" if self.plan.expired else "no_plan"
        elif not view.wants_prefill() and (running_batch is None or running_batch.is_empty()):
            view, self.fallback = None, "idle"
        else:
            self.fallback = None
        self.building_plan = view
        if view is None:
            return original(self.scheduler, running_batch)
        return not (view.wants_prefill() or self._arrival_waiting(view))

    def _arrival_waiting(self, view: PlanView) -> bool:
        """A waiting request the plan does not know may prefill now (the plan's arrival allowance)."""
        if view.arrival_tokens <= 0:
            return False
        return any(view.admits_arrival(r.rid) for r in getattr(self.scheduler, "waiting_queue", ()))

    def plan_for_build(self):
        """The plan the prefill adder and the queue order follow (None: SGLang's rules)."""
        return None if self.fallback == "idle" else self.plan.view

    def after_launch(self, batch) -> None:
        """Every rank, right after `run_batch`: the plan's chunks that ran are used up."""
        view = self.building_plan
        if view is not None and view is self.plan.view and batch.forward_mode.is_extend():
            riders = decoders_in_mixed(batch)
            self.plan.consume([r.rid for r in batch.reqs if id(r) not in riders])
        if self.leader():
            self.note_launch(batch)

    def note_launch(self, batch) -> None:
        """Remember which plan built the batch SGLang just launched, and the depth it drafted with.

        Runs right after `run_batch`: the worker has activated this batch's depth tier by then.
        """
        self.plan_of_launch[batch.forward_iter] = (self.building_plan, self._current_depth(), self.fallback)
        self.last_launch_s = float(batch.launch_ts or self.clock())

    # ---------------------------------------------------------------- rank 0

    def poll(self) -> list:
        """Runs in `_poll_timeout_aborts` on rank 0; returns objects for SGLang's broadcast."""
        now = self.clock()
        out: list = []
        if self.endpoint is None:
            self._arrivals.clear()
            return self._with_shared_clock(out, now)  # no planner: arrival stamps must still agree
        if self.link is None:
            self.link = PlannerLink(self.endpoint, self._hello, self._resync)
        plan = self.link.poll(now)
        self._announce_arrivals(now)
        if plan is not None:
            self._valid_until_s = plan.valid_until_s
            self._expire_sent = False
            out.append(PlannerUpdate(plan=plan))
            out.extend(self._rejections(plan, now))
        elif not self._expire_sent and now > self._valid_until_s:
            self._expire_sent = True
            out.append(PlannerUpdate(expire=True))
        if now - self._last_sweep_s >= SWEEP_S:
            self._last_sweep_s = now
            self._sweep_gone(now)
        return self._with_shared_clock(out, now)

    def _with_shared_clock(self, out: list, now: float) -> list:
        """TP > 1: rank 0's clock rides every broadcast, planner or not (see `_arrival_clock`).

        Without it every rank stamps arrivals with its own clock read (ranks dispatch the same
        request up to milliseconds apart), so deadline order (EDF fallback) could differ
        between ranks and so would the batches they build.
        """
        if self.tp_size() > 1:
            if out and isinstance(out[0], PlannerUpdate):
                out[0].now_s = now
            else:
                out.insert(0, PlannerUpdate(now_s=now))
        return out

    def report(self, batch, result) -> None:
        """Runs after `process_batch_result` on rank 0: IterationReport + RequestFinished."""
        now = self.clock()
        note_first_tokens(batch.reqs, now)
        self.step += 1
        sched = self.scheduler
        if self.link is None:
            return
        plan, depth, fallback = self.plan_of_launch.pop(batch.forward_iter, (None, 0, "no_plan"))
        # Iteration end = the next batch's launch when SGLang's overlap loop already launched it
        # (this result is processed one launch late; on CPU the forward runs inside the launch),
        # else now: the planner's cost model then sees launch-to-launch periods, not two forwards.
        start = float(batch.launch_ts or now)
        end_s = self.last_launch_s if self.last_launch_s > start else now
        plan_step = plan.step if plan is not None else -1
        report = build_report(
            batch,
            result,
            step=self.step,
            plan_step=plan_step,
            end_s=end_s,
            kv_free_tokens=kv_free_tokens(sched),
            waiting=len(sched.waiting_queue),
            spec_depth=depth,
        )
        if self.link.send(report, now):
            self.reports_sent += 1
        if self._report_log is not None:
            self._log_iteration(report, batch, plan, fallback)
        for req in batch.reqs:
            if req.finished() and req.rid in self.tracked:
                self._finish(req, finish_reason_of(req), now)

    def _log_iteration(self, report, batch, plan: PlanView | None, fallback: str | None) -> None:
        line = {
            "step": report.step, "plan_step": report.plan_step, "start_s": report.start_s, "end_s": report.end_s,
            "fallback": fallback,
            "mode": _mode(batch),
            "prefill": {p.rid: p.prefill_tokens for p in report.progress if p.prefill_tokens},
            "rids": [p.rid for p in report.progress], "waiting": report.waiting,
            "plan_prefill": dict(plan.prefill_tokens) if plan is not None else None,
            "plan_budget": plan.token_budget if plan is not None else None,
            "plan_spec_depth": plan.spec_depth if plan is not None else None,
            "plan_arrival_tokens": plan.arrival_tokens if plan is not None else None,
            "draft_steps": report.draft_steps,
            "kv_free": report.kv_free_tokens,
            "kv_unused": int(self.scheduler.token_to_kv_pool_allocator.available_size()),  # without evictable
            "link_up": bool(self.link and self.link.up),
        }
        self._report_log.write(_LOG_LINE.encode(line) + b"\n")  # one unbuffered append per line

    def _announce_arrivals(self, now: float) -> None:
        for req in self._arrivals:
            if req.finished() or req_slo(req) is None:
                continue
            self.tracked[req.rid] = req
            self.link.send(self._arrived(req), now)
        self._arrivals.clear()

    def _arrived(self, req) -> RequestArrived:
        s = req_slo(req)
        return RequestArrived(
            rid=req.rid,
            prompt_tokens=len(req.origin_input_ids),
            max_new_tokens=int(req.sampling_params.max_new_tokens or 0),
            slo=s.slo,
            arrival_s=s.arrival_s,
            session_id=s.session_id,
            cached_prefix_tokens=int(getattr(req, "prefix_len", 0) or 0),
        )

    def _rejections(self, plan, now: float) -> list:
        """AbortReqs for REJECT decisions (they ride the broadcast like SGLang's timeout aborts).

        HTTP 429, the project's status for admission-control rejections (clients may retry).
        """
        from sglang.srt.managers.io_struct import AbortReq

        out = []
        for d in plan.decisions:
            if d.decision != Decision.REJECT or d.rid not in self.tracked:
                continue
            msg = "rejected by the SLO planner: its SLO cannot be met under the current load"
            out.append(
                AbortReq(
                    rid=d.rid,
                    abort_message=msg,
                    finished_reason={"type": "abort", "status_code": HTTPStatus.TOO_MANY_REQUESTS, "message": msg},
                )
            )
            self.rejected += 1
            self._finish(self.tracked[d.rid], FinishReason.REJECTED, now, msg)
        return out

    def _finish(self, req, reason: FinishReason, now: float, message: str = "") -> None:
        self.tracked.pop(req.rid, None)
        self.link.send(RequestFinished(rid=req.rid, reason=reason, decoded=len(req.output_ids), finish_s=now, message=message), now)

    def _sweep_gone(self, now: float) -> None:
        """Requests that left without a batch result (aborted while queued) are reported finished."""
        live = {r.rid for r in self._live_reqs()}
        for rid, req in list(self.tracked.items()):
            if rid not in live:
                self._finish(req, finish_reason_of(req) if req.finished() else FinishReason.ABORT, now)

    def _live_reqs(self):
        sched = self.scheduler
        reqs = list(getattr(sched, "waiting_queue", []))
        for batch in (getattr(sched, "running_batch", None), getattr(sched, "last_batch", None)):
            if batch is not None:
                reqs.extend(batch.reqs)
        for batch, _ in getattr(sched, "result_queue", ()):
            reqs.extend(batch.reqs)
        if getattr(sched, "chunked_req", None) is not None:
            reqs.append(sched.chunked_req)
        return reqs

    def _current_depth(self) -> int:
        worker = getattr(self.scheduler, "draft_worker", None)
        return int(getattr(worker, "speculative_num_steps", 0) or 0) if worker is not None else 0

    def _hello(self, now: float) -> EngineHello:
        sched = self.scheduler
        tiers = _depth_tiers()
        budget = getattr(sched, "chunked_prefill_size", None) or getattr(sched, "max_prefill_tokens", 0)
        return EngineHello(
            protocol_version=PROTOCOL_VERSION,
            engine="sglang",
            spec_modes=[SpecMode.NONE, SpecMode.CHAIN] if tiers else [SpecMode.NONE],
            max_batch_tokens=int(budget or 1),
            kv_capacity_tokens=int(getattr(sched, "max_total_num_tokens", 0) or 1),
            max_depth=max(tiers, default=0),
            max_width=1,
            depth_tiers=tiers,
            kv_block_tokens=int(getattr(sched, "page_size", 1) or 1),
            clock_s=now,
            mixed_forward=bool(getattr(sched, "is_mixed_chunk", False)),
        )

    def _resync(self, now: float) -> Resync:
        snaps = []
        for req in self.tracked.values():
            s = req_slo(req)
            prefilled = len(req.origin_input_ids) if req.output_ids else int(getattr(req, "prefix_len", 0) or 0)
            snaps.append(
                RequestSnapshot(
                    arrived=self._arrived(req),
                    prefilled=prefilled,
                    decoded=len(req.output_ids),
                    first_token_s=s.first_token_s if s else 0.0,
                    decision=Decision.ADMIT if req.output_ids else Decision.DEFER,
                )
            )
        sched = self.scheduler
        return Resync(
            now_s=now,
            step=self.step,
            requests=snaps,
            kv_free_tokens=kv_free_tokens(sched),
        )


def _mode(batch) -> str:
    """'prefill', 'mixed' (prefill with decoders riding along) or 'decode'."""
    fm = batch.forward_mode
    return "mixed" if fm.is_mixed() else "prefill" if fm.is_extend() else "decode"


def kv_free_tokens(sched) -> int:
    """KV tokens a new request can still get: free slots plus the radix cache's evictable ones.

    SGLang keeps finished requests' KV in its prefix cache and evicts it only on demand, so the
    allocator's free count alone sinks towards 0 after a few thousand tokens of traffic while
    SGLang still admits freely (its PrefillAdder counts available + evictable too).
    """
    free = int(sched.token_to_kv_pool_allocator.available_size())
    cache = getattr(sched, "tree_cache", None)
    return free + (int(cache.evictable_size()) if cache is not None else 0)


def _open_log(path: str | None):
    return open(path, "ab", buffering=0) if path else None


def _depth_tiers() -> list[int]:
    """Candidate depths SGLang pre-captured (adaptive EAGLE), or [] without speculation."""
    try:
        from sglang.srt.runtime_context import get_spec  # noqa: PLC0415 -- resolved at runtime
    except ImportError:
        return []
    try:
        spec = get_spec()
    except Exception:  # config namespace not published (unit tests)
        return []
    if not getattr(spec, "speculative_algorithm", None):
        return []
    if not getattr(spec, "speculative_adaptive", False):
        steps = getattr(spec, "speculative_num_steps", 0) or 0
        return [int(steps)] if steps else []
    from sglang.srt.speculative.adaptive_spec_params import resolve_candidate_steps_from_config

    return resolve_candidate_steps_from_config(getattr(spec, "speculative_adaptive_config", None))
