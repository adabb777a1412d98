"""`SidecarLink`: the engine's end of the ZMQ link to the planner sidecar (used on the engine thread).

States: not welcomed -> (EngineHello sent, repeated every `_HELLO_RETRY_S` until answered)
-> welcomed (PlannerWelcome accepted; a Resync with the full in-flight state follows at once,
so a fresh or restarted planner starts from the truth). While not welcomed, events are
dropped (the Resync carries them) and no plans are taken; the engine runs its fallback.
`restart()` (any thread) asks for a new handshake: the supervisor calls it when it restarted
the sidecar. Sending never blocks (`EngineChannel` sends with NOBLOCK).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from protos import messages as protos
from protos.channel import EngineChannel

log = logging.getLogger(__name__)

_HELLO_RETRY_S = 0.5  # seconds between EngineHello attempts while unanswered


class SidecarLink:
    """Handshake, resync, event forwarding and plan intake over one DEALER socket."""

    def __init__(self, endpoint: str, hello: Callable[[], protos.EngineHello], resync: Callable[[], protos.Resync]):
        self.channel = EngineChannel(endpoint)
        self._hello, self._resync = hello, resync
        self.welcomed = False
        self.policy = ""
        self.refused = ""
        """The planner's reason when it refused our hello ('' = not refused)."""
        self.handshakes = 0
        self.plans = 0
        self._last_hello = 0.0
        self._restart = threading.Event()

    def handshake(self, timeout_s: float) -> protos.PlannerWelcome:
        """Block until the planner welcomes us (start-up only); raises TimeoutError/RuntimeError."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.poll(wait_ms=50)
            if self.welcomed:
                return protos.PlannerWelcome(protocol_version=protos.PROTOCOL_VERSION, accepted=True, policy=self.policy)
            if self.refused:
                raise RuntimeError(f"planner refused the engine: {self.refused}")
        raise TimeoutError(f"no PlannerWelcome from {self.channel.endpoint} within {timeout_s:.0f}s")

    def restart(self) -> None:
        """The planner process was replaced: handshake again (thread-safe)."""
        self._restart.set()

    def send(self, events: Sequence[protos.Message]) -> None:
        if not self.welcomed:
            return
        for e in events:
            if not self.channel.send(e):
                log.debug("planner link: %s not sent (no planner connected)", type(e).__name__)

    def poll(self, wait_ms: int = 0) -> list[protos.Plan]:
        """Plans that arrived (handles welcomes and re-handshakes on the way)."""
        if self._restart.is_set():
            self._restart.clear()
            self.welcomed = False
            self._last_hello = 0.0
        if not self.welcomed and not self.refused and time.monotonic() - self._last_hello > _HELLO_RETRY_S:
            self._last_hello = time.monotonic()
            self.channel.send(self._hello())
        plans = []
        msg = self.channel.recv(wait_ms)
        while msg is not None:
            if isinstance(msg, protos.PlannerWelcome):
                self._on_welcome(msg)
            elif isinstance(msg, protos.Plan) and self.welcomed:
                plans.append(msg)
                self.plans += 1
            msg = self.channel.recv(0)
        return plans

    def _on_welcome(self, w: protos.PlannerWelcome) -> None:
        if not w.accepted:
            self.refused = w.reason or "refused"
            log.error("planner refused the engine: %s (serving on the fallback policy)", self.refused)
            return
        self.welcomed, self.policy = True, w.policy
        self.handshakes += 1
        self.channel.send(self._resync())
        log.info("planner link: welcomed by policy %s (handshake %d), state resynchronised", w.policy, self.handshakes)

    def close(self) -> None:
        self.channel.close()
