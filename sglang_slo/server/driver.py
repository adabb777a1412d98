"""What the bridge needs from an engine: `Driver` (interface) and `StepResult`.

The embedded runtime's adapter is `embedded.EmbeddedDriver`; all calls happen on the engine
thread, so drivers need no locks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from protos.messages import FinishReason
from sglang_slo.slo import SloRequest


@dataclass
class StepResult:
    """What one engine iteration produced."""

    new_tokens: dict[str, list[int]] = field(default_factory=dict)
    """rid -> output token ids committed this iteration."""
    finished: dict[str, tuple[FinishReason, str]] = field(default_factory=dict)
    """rid -> (reason, message) for requests that ended this iteration."""
    spec: dict[str, tuple[int, int]] = field(default_factory=dict)
    """rid -> (verify forwards, draft tokens accepted) this iteration (speculating requests)."""


class Driver(Protocol):
    def add(self, rid: str, prompt_ids: list[int], params: object, intake: SloRequest, arrival_s: float) -> str:
        """Queue a request; returns '' or why the engine refused it."""

    def abort(self, rid: str) -> None:
        """Drop a request and free its KV (unknown or finished rids are ignored)."""

    def set_stage(self, rid: str, stage: int) -> None:
        """The request entered SLO stage `stage` (its end-of-stage marker was generated)."""

    def has_work(self) -> bool: ...

    def step(self) -> StepResult:
        """Run one iteration (applying the freshest plan or the local fallback)."""

    def idle(self) -> None:
        """Nothing to run: service the planner link (handshake, resync) without a forward."""

    def close(self) -> None: ...
