"""The scheduler's one connection to the planner sidecar (TP rank 0 only).

Never blocks: every send is NOBLOCK and every receive polls with a zero timeout, so a slow,
dead or restarting planner costs plan freshness, never scheduler time. Protocol states:

    DOWN --hello sent--> WAITING --PlannerWelcome(accepted)--> UP --send fails--> DOWN
                                  (Resync sent on every UP transition)

While not UP, events are dropped (the Resync after the next welcome carries the full
in-flight state instead) and hellos are retried every `retry_s`. A planner that restarts at
the same endpoint is reconnected by ZeroMQ silently and knows nothing of this engine, so a
planner that has sent nothing for `silence_s` while events were waiting for an answer is
treated as lost too: the link goes DOWN and handshakes again.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable

from protos.channel import EngineChannel
from protos.messages import EngineHello, Message, Plan, PlannerWelcome, Resync

log = logging.getLogger(__name__)


class LinkState(enum.Enum):
    DOWN = "down"
    WAITING = "waiting"  # hello sent, no welcome yet
    UP = "up"


class PlannerLink:
    """DEALER client: handshake, event sending, newest-plan draining, reconnects."""

    def __init__(
        self,
        endpoint: str,
        hello: Callable[[float], EngineHello],
        resync: Callable[[float], Resync],
        retry_s: float = 0.5,
        silence_s: float = 1.0,
    ):
        """`hello(now)`/`resync(now)` build the handshake and the full-state snapshot."""
        self.channel = EngineChannel(endpoint)
        self._hello = hello
        self._resync = resync
        self.retry_s = retry_s  # seconds between hello attempts while not UP
        self.silence_s = silence_s  # seconds without any answer to sent events -> re-handshake
        self._unanswered_since_s: float | None = None  # first send not followed by any message
        self.state = LinkState.DOWN
        self._last_hello_s = float("-inf")
        self.refused_reason = ""
        self.sent = 0
        self.dropped = 0
        self.welcomes = 0

    def send(self, msg: Message, now_s: float) -> bool:
        """Send one event if the planner is UP; a failed send marks the link DOWN."""
        if self.state is not LinkState.UP:
            self.dropped += 1
            return False
        if self.channel.send(msg):
            self.sent += 1
            if self._unanswered_since_s is None:
                self._unanswered_since_s = now_s
            return True
        log.warning("planner link: send failed (planner gone?); falling back until it returns")
        self.state = LinkState.DOWN
        self.dropped += 1
        return False

    def poll(self, now_s: float) -> Plan | None:
        """Handle the handshake and return the newest plan received since the last poll."""
        newest: Plan | None = None
        received = self.channel.drain()
        if received:
            self._unanswered_since_s = None
        elif (self.state is LinkState.UP and self._unanswered_since_s is not None
              and now_s - self._unanswered_since_s > self.silence_s):
            log.warning("planner silent for %.1fs; handshaking again (planner restarted?)",
                        now_s - self._unanswered_since_s)
            self.state = LinkState.DOWN
            self._last_hello_s = float("-inf")
        for msg in received:
            if isinstance(msg, PlannerWelcome):
                self._on_welcome(msg, now_s)
            elif isinstance(msg, Plan) and self.state is LinkState.UP:
                if newest is None or msg.step >= newest.step:
                    newest = msg
        if self.state is not LinkState.UP and now_s - self._last_hello_s >= self.retry_s:
            self._last_hello_s = now_s
            if self.channel.send(self._hello(now_s)):
                self.state = LinkState.WAITING
                self._unanswered_since_s = None
            else:
                self.state = LinkState.DOWN
        return newest

    def _on_welcome(self, msg: PlannerWelcome, now_s: float) -> None:
        if not msg.accepted:
            if msg.reason != self.refused_reason:
                log.error("planner refused this engine: %s (running on SGLang's own policy)", msg.reason)
            self.refused_reason = msg.reason
            self.state = LinkState.DOWN
            self._last_hello_s = now_s + 10 * self.retry_s  # don't hammer a refusing planner
            return
        self.state = LinkState.UP
        self.welcomes += 1
        self.refused_reason = ""
        log.info("planner link up (policy %s, welcome #%d)", msg.policy, self.welcomes)
        self.send(self._resync(now_s), now_s)

    @property
    def up(self) -> bool:
        return self.state is LinkState.UP

    def close(self) -> None:
        self.channel.close()
