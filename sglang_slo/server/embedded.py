"""`EmbeddedDriver`: the bridge's view of the embedded `Engine` plus its planner link.

Runs on the engine thread. Each iteration: take the newest plans from the link, step the
engine, forward its events (RequestFinished..., IterationReport) to the planner, and turn
its output into a `StepResult`. Without a link (or while the sidecar is down) the engine's
own fallback policy runs; the engine never waits for the planner.

The engine does not track SLO stages; the bridge detects stage markers and this driver
stamps the stage into the `RequestProgress` it sends, so the planner sees reasoning requests
switch from think to answer (a Resync after a planner restart carries stage 0: the engine's
snapshot has no stage yet).
"""

from __future__ import annotations

import logging

from sglang_slo.engine.engine import Engine
from sglang_slo.engine.request import InvalidRequestError
from sglang_slo.server.driver import StepResult
from sglang_slo.server.metrics import ServerMetrics
from sglang_slo.slo import SloRequest

log = logging.getLogger(__name__)

_EMPTY_STEP_WAIT_MS = 20  # most time to wait for a plan after an iteration without a forward
_STUCK_RESYNC_S = 1.0  # seconds of iterations without a forward (work waiting) before a resync


class EmbeddedDriver:
    """Adapter Engine (+ optional planner link) -> `Driver`."""

    def __init__(self, engine: Engine, metrics: ServerMetrics, link=None):
        self.engine = engine
        self.metrics = metrics
        self.link = link
        """`sglang_slo.engine.planner_link.PlannerLink` or None (fallback policy only)."""
        self._plan_seen = None
        self._last_empty = False
        self._empty_since: float | None = None  # engine clock of the first of consecutive empty iterations
        self.stuck_resyncs = 0
        """Resyncs forced because work waited with no forward for `_STUCK_RESYNC_S` (a lost
        event, e.g. a RequestArrived dropped at the socket's high-water mark)."""
        self.verify_forwards = 0
        """(request, iteration) pairs that verified a draft; with `accepted_tokens` gives the
        server-wide mean accept length (SGLang's avg_spec_accept_length)."""
        self.accepted_tokens = 0
        self.stages: dict[str, int] = {}
        metrics.kv_capacity.set(engine.tables.target.capacity_tokens)
        metrics.kv_free.set(engine.tables.free_tokens)

    # ---- Driver ------------------------------------------------------------------------

    def add(self, rid: str, prompt_ids: list[int], params, intake: SloRequest, arrival_s: float) -> str:
        try:
            arrived = self.engine.add_request(rid, prompt_ids, params, intake.slo, intake.session_id)
        except InvalidRequestError as e:
            return str(e)
        if self.link is not None:
            self.link.send([arrived])
        return ""

    def abort(self, rid: str) -> None:
        self.engine.abort(rid, "client disconnected")
        self.stages.pop(rid, None)
        self.metrics.kv_free.set(self.engine.tables.free_tokens)

    def set_stage(self, rid: str, stage: int) -> None:
        self.stages[rid] = stage

    def has_work(self) -> bool:
        return self.engine.has_work

    def step(self) -> StepResult:
        # After an iteration that ran no forward (everything waits for admission by a plan
        # not here yet), wait briefly for the plan instead of spinning empty iterations that
        # flood the planner with reports and steal its CPU.
        self._take_plans(wait_ms=_EMPTY_STEP_WAIT_MS if self._last_empty else 0)
        out = self.engine.step()
        res = StepResult(new_tokens=out.new_tokens)
        for f in out.finished:
            res.finished[f.rid] = (f.reason, f.message)
            self.stages.pop(f.rid, None)
        report = out.report
        if report is not None:
            for p in report.progress:
                if p.verified:
                    res.spec[p.rid] = (1, p.accepted)
                    self.verify_forwards += 1
                    self.accepted_tokens += p.accepted
                    self.metrics.spec_verified.inc(p.verified)
                    self.metrics.spec_accepted.inc(p.accepted)
                p.stage = self.stages.get(p.rid, 0)
            planned = report.plan_step >= 0
            self.metrics.iterations.labels(str(planned).lower()).inc()
            if not planned:
                self.metrics.fallback.inc()
            self.metrics.kv_free.set(report.kv_free_tokens)
            self.metrics.waiting.set(report.waiting)
            self._last_empty = report.prefill_tokens == 0 and report.verify_tokens == 0
            self._watch_stuck(report.end_s)
        if self.link is not None:
            self.link.send(out.events)
        return res

    def _watch_stuck(self, now: float) -> None:
        """Work waits, yet iterations run no forward: the planner may lack state; resync it."""
        if not self._last_empty or self.link is None:
            self._empty_since = None
            return
        if self._empty_since is None:
            self._empty_since = now
        elif now - self._empty_since > _STUCK_RESYNC_S and self.link.welcomed:
            log.warning("no forward for %.1fs with work waiting: resynchronising the planner", now - self._empty_since)
            self.stuck_resyncs += 1
            self._empty_since = None
            self.link.restart()  # handshake again; the welcome is followed by a full Resync

    @property
    def avg_accept_length(self) -> float:
        """Mean tokens committed per verify forward (1.0 before any speculation)."""
        v = self.verify_forwards
        return (v + self.accepted_tokens) / v if v else 1.0

    def idle(self) -> None:
        self._take_plans()
        self.metrics.kv_free.set(self.engine.tables.free_tokens)

    def close(self) -> None:
        if self.link is not None:
            self.link.close()

    # ---- planner link --------------------------------------------------------------------

    def _take_plans(self, wait_ms: int = 0) -> None:
        """Let the link apply queued plans to the engine (and handshake when needed)."""
        if self.link is None or not self.link.poll(wait_ms=wait_ms):
            return
        plan = self.engine.plan
        if plan is not None and plan is not self._plan_seen:
            self._plan_seen = plan
            self.metrics.plan_latency.observe(plan.plan_latency_s)
