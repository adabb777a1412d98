"""`PlannerLink`: the thin shell between an `Engine` and the planner sidecar (one DEALER socket).

    link = PlannerLink(engine, endpoint)          # sends EngineHello (retried until answered)
    link.add_request(rid, prompt_ids, params, slo)
    while engine.has_work:
        out = link.step()                         # drain plans -> engine.step() -> send events

Never blocks the step: plans are drained with a zero timeout and sends are NOBLOCK. Plans are
pipelined by the sidecar (the plan for step k+2 is computed from report k while the engine
runs step k+1) and carry `valid_until_s`; when none is valid the engine's EDF fallback runs
and its report says plan_step = -1. After every (re)welcome the link sends a `Resync` with the
engine's full in-flight state, so a restarted planner starts from the truth; while not
welcomed, events are dropped (the Resync will carry them).
"""

from __future__ import annotations

import logging
import time

from protos import messages as protos
from protos.channel import EngineChannel
from sglang_slo.engine.engine import Engine, StepOutput
from sglang_slo.engine.request import SamplingParams

log = logging.getLogger(__name__)


class PlannerLink:
    """Handshake, resync, event forwarding and plan intake for one engine."""

    def __init__(self, engine: Engine, endpoint: str, hello_retry_s: float = 0.5, silent_after_s: float = 2.0):
        self.engine = engine
        self.channel = EngineChannel(endpoint)
        self.hello_retry_s = hello_retry_s
        """Seconds between EngineHello attempts while unanswered."""
        self.welcomed = False
        self.refused = ""
        """The planner's reason if it refused our hello ('' = not refused)."""
        self.policy = ""
        self.handshakes = 0
        self.plans_received = 0
        self.silent_after_s = silent_after_s
        """A welcomed planner that sent no plan for this long while we reported is presumed
        restarted (a new process does not know us): handshake again."""
        self._last_hello = -float("inf")
        self._last_plan = time.monotonic()

    # ---- engine API with forwarding ----------------------------------------------------

    def add_request(self, rid: str, prompt_ids: list[int], params: SamplingParams, slo: protos.Slo,
                    session_id: str = "") -> protos.RequestArrived:
        """`Engine.add_request` (raises InvalidRequestError) + tell the planner."""
        arrived = self.engine.add_request(rid, prompt_ids, params, slo, session_id)
        self.send([arrived])
        return arrived

    def abort(self, rid: str, message: str = "aborted") -> None:
        self.engine.abort(rid, message)  # its RequestFinished goes out with the next step's events

    def step(self) -> StepOutput:
        """Take plans that arrived, run one engine step, send its events."""
        if not self.engine.has_work:
            self._last_plan = time.monotonic()  # an idle engine gets no plans: not silence
        self.poll()
        out = self.engine.step()
        self.send(out.events)
        return out

    # ---- link ------------------------------------------------------------------------

    def restart(self) -> None:
        """The planner was replaced: handshake again (a Resync follows the welcome)."""
        self.welcomed = False
        self.refused = ""
        self._last_hello = -float("inf")

    def poll(self, wait_ms: int = 0) -> int:
        """Handle welcomes and apply every plan already queued; returns plans applied."""
        if self.welcomed and time.monotonic() - self._last_plan > self.silent_after_s:
            log.warning("planner silent for %.1f s: handshaking again", self.silent_after_s)
            self.restart()
        if not self.welcomed and not self.refused and time.monotonic() - self._last_hello >= self.hello_retry_s:
            self._last_hello = time.monotonic()
            self.channel.send(self.engine.hello())
        n = 0
        msg = self.channel.recv(wait_ms)
        while msg is not None:
            if isinstance(msg, protos.PlannerWelcome):
                self._on_welcome(msg)
            elif isinstance(msg, protos.Plan) and self.welcomed:
                self.engine.apply_plan(msg)
                self.plans_received += 1
                self._last_plan = time.monotonic()
                n += 1
            msg = self.channel.recv(0)
        return n

    def wait_welcome(self, timeout_s: float) -> bool:
        """Block until welcomed (start-up only); False on timeout or refusal."""
        deadline = time.monotonic() + timeout_s
        while not self.welcomed and not self.refused and time.monotonic() < deadline:
            self.poll(wait_ms=20)
        return self.welcomed

    def send(self, events: list[protos.Message]) -> None:
        if self.welcomed:
            for e in events:
                self.channel.send(e)

    def close(self) -> None:
        self.channel.close()

    def _on_welcome(self, w: protos.PlannerWelcome) -> None:
        if not w.accepted:
            self.refused = w.reason or "refused"
            log.error("planner refused the engine: %s (running on the fallback policy)", self.refused)
            return
        self.welcomed, self.policy = True, w.policy
        self.handshakes += 1
        self._last_plan = time.monotonic()
        self.channel.send(self.engine.resync())
