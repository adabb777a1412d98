"""`PlannerProc`: the sidecar's I/O shell around a `Planner` (one ZMQ ROUTER, one loop).

Loop: wait for frames; answer EngineHello with PlannerWelcome (refusing with a reason via
`protos.messages.check_hello`); apply every other event to the planner; after an
IterationReport (and after draining everything already queued, so the plan sees the newest
state) send a Plan for step report.step + 2: the engine is already running step + 1.
A Resync replaces the planner's state and is answered with a fresh plan too.
Clean shutdown on SIGTERM/SIGINT (the loop polls with a short timeout and checks a flag).
In steady decode (nothing waiting, nothing prefilling, nothing new; Planner.steady) a real
engine's report is answered only every `steady_skips + 1`-th time: the plan in force still holds.
With `busy_poll` the loop never sleeps in the kernel: a report is seen within microseconds
instead of after a wake-up (~30-70 us here), at the price of one CPU core.
Automatic garbage collection is off while serving: the young generation (~100 us a
collection here) is collected between message batches, after the plan is sent, where it
cannot delay a plan (it did in ~1 of 500 round trips).
"""

from __future__ import annotations

import gc
import logging
import signal
import time

from protos import messages as protos
from protos.channel import PlannerChannel
from sidecar.planner import Planner

log = logging.getLogger(__name__)

_POLL_MS = 50  # how often the loop checks the stop flag while idle
_STATS_EVERY_S = 10.0  # period of the INFO stats line


class PlannerProc:
    """Owns the planner's socket and runs the event loop."""

    def __init__(self, endpoint: str, planner: Planner, policy_name: str = "", busy_poll: bool = False,
                 adapt_horizon: bool = True, steady_skips: int = 2):
        self.planner = planner
        self.busy_poll = busy_poll
        self.adapt_horizon = adapt_horizon
        """Real engines get plans valid for the measured plan lag too (Planner.adaptive_horizon)."""
        planner.defer_upkeep = True  # acceptance updates and refits run after the plan is sent
        self.steady_skips = steady_skips
        """A real engine in steady decode (Planner.steady) gets no new plan for up to this many
        reports in a row: the one in force still says the same and stays valid for several
        predicted iterations, and on a shared CPU the planning it saves competes with the engine."""
        self._skipped_in_row = 0
        self.plans_skipped = 0
        self.policy_name = policy_name or planner.policy.name
        self.channel = PlannerChannel(endpoint)
        self.endpoint = self.channel.endpoint
        self.engine_id: bytes | None = None
        self.simulated_clock = False
        """The engine is the simulator: its clock only moves between iterations."""
        self._stop = False
        self.plans_sent = 0
        self._window = [0, 0.0, 0.0]  # plans, summed latency (s), max latency (s) since the last stats line
        self._next_stats = time.monotonic() + _STATS_EVERY_S

    def stop(self, *_: object) -> None:
        """Ask the loop to exit (signal-handler safe)."""
        self._stop = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(self) -> int:
        """Serve until stop(); returns the process exit code."""
        log.info("planner: policy=%s listening on %s", self.policy_name, self.endpoint)
        # Start-up objects (modules, numpy, yaml) never die: move them out of the collector's
        # sight so a full collection mid-run costs microseconds, not tens of milliseconds.
        gc.collect()
        gc.freeze()
        gc.disable()  # collections run in _collect_garbage, between batches
        wait_ms = 0 if self.busy_poll else _POLL_MS
        try:
            while not self._stop:
                got = self.channel.recv(wait_ms)
                if got is not None:
                    self._handle_batch(got)
                    _collect_garbage()  # the batch's plan, if any, is out
                if time.monotonic() >= self._next_stats:
                    self._log_stats()
        finally:
            gc.enable()
            self.channel.close()
            log.info("planner: stopped after %d plans", self.plans_sent)
        return 0

    def _handle_batch(self, first: tuple[bytes, protos.Message]) -> None:
        """Apply `first` and everything already queued, then plan once if a report/resync came."""
        replan_for: protos.IterationReport | protos.Resync | None = None
        recv_t = time.monotonic()
        got: tuple[bytes, protos.Message] | None = first
        while got is not None:
            engine_id, msg = got
            if isinstance(msg, protos.EngineHello):
                self._welcome(engine_id, msg)
                replan_for = None
            elif engine_id != self.engine_id:
                log.warning("planner: %s from an engine without an accepted hello skipped", type(msg).__name__)
            else:
                try:
                    self.planner.observe(msg)
                except Exception:  # a bad message must cost one event, not the planner
                    log.exception("planner: failed to apply %s; skipped", type(msg).__name__)
                if isinstance(msg, (protos.IterationReport, protos.Resync)):
                    replan_for, recv_t = msg, time.monotonic()
            got = self.channel.recv(0)
        if replan_for is not None and self.engine_id is not None:
            if (isinstance(replan_for, protos.IterationReport) and not self.simulated_clock
                    and self._skipped_in_row < self.steady_skips and self.planner.steady()):
                self._skipped_in_row += 1
                self.plans_skipped += 1
                self.planner.upkeep()
                return
            self._skipped_in_row = 0
            self._send_plan(replan_for, recv_t)

    def _log_stats(self) -> None:
        n, total, worst = self._window
        st = self.planner.state
        if n:
            log.info(
                "planner: %d plans in %.0f s (latency mean %.3f ms, max %.3f ms), %d requests, step %d, "
                "cost scale %.2f, unknown-rid skips %d, steady reports unplanned %d",
                n, _STATS_EVERY_S, 1e3 * total / n, 1e3 * worst, len(st.requests), st.step,
                self.planner.cost.scale, self.planner.skipped_unknown, self.plans_skipped,
            )
            counters = getattr(self.planner.policy, "counters", None)  # the policy's own totals, if any
            if counters:
                log.info("planner: policy counters %s", counters)
        self._window = [0, 0.0, 0.0]
        self._next_stats = time.monotonic() + _STATS_EVERY_S

    def _welcome(self, engine_id: bytes, hello: protos.EngineHello) -> None:
        reason = protos.check_hello(hello)
        accepted = not reason
        self.channel.send(
            engine_id,
            protos.PlannerWelcome(
                protocol_version=protos.PROTOCOL_VERSION,
                accepted=accepted,
                policy=self.policy_name,
                reason=reason,
                config_hash=hello.config_hash,
            ),
        )
        if accepted:
            self.engine_id = engine_id
            self.simulated_clock = hello.engine == "sim"
            # Off the critical path only where latency is real; a simulated engine gets the
            # same order as in-process planning (refit, then plan).
            self.planner.defer_upkeep = not self.simulated_clock
            # A real engine applies a plan whenever it arrives, late when this process waits for
            # a CPU; a simulated one on a fixed schedule (and its runs reproduce in-process ones).
            self.planner.adaptive_horizon = self.adapt_horizon and not self.simulated_clock
            self.planner.plans_apply_late = not self.simulated_clock
            # Plans outlive the steady reports this loop may leave unanswered.
            self.planner.extra_horizon_iters = 0.0 if self.simulated_clock else float(self.steady_skips)
            self.planner.observe(hello)
            log.info("planner: engine %r (%s) connected, config %s", engine_id, hello.engine, hello.config_hash)
        else:
            log.warning("planner: refused engine %r: %s", engine_id, reason)

    def _send_plan(self, basis: protos.IterationReport | protos.Resync, recv_t: float) -> None:
        # Engine clock "now": the basis' time plus what elapsed here since it arrived (robust
        # to a clock offset between processes). A simulated engine's clock stands still while
        # it waits for the plan, so there "now" is the basis' time exactly (and runs over ZMQ
        # reproduce in-process runs).
        base_s = basis.end_s if isinstance(basis, protos.IterationReport) else basis.now_s
        now_s = base_s if self.simulated_clock else base_s + (time.monotonic() - recv_t)
        try:
            plan = self.planner.plan(now_s, step=basis.step + 2 if isinstance(basis, protos.IterationReport) else basis.step + 1)
        except Exception:
            log.exception("planner: policy %s failed; no plan this step (engine falls back)", self.policy_name)
            return
        if self.channel.send(self.engine_id, plan):  # type: ignore[arg-type]
            self.plans_sent += 1
            w = self._window
            w[0] += 1
            w[1] += plan.plan_latency_s
            w[2] = max(w[2], plan.plan_latency_s)
        self.planner.upkeep()


def _collect_garbage() -> None:
    """The collection the interpreter would have run by now (same thresholds), at a time of
    the loop's choosing: the oldest generation whose count reached its threshold."""
    counts, thresholds = gc.get_count(), gc.get_threshold()
    if counts[0] >= thresholds[0]:
        gc.collect(2 if counts[2] >= thresholds[2] else 1 if counts[1] >= thresholds[1] else 0)
