"""A request inside the simulated engine: the generated request plus its progress.

It is scheduled by the embedded engine's own Scheduler, so it offers the engine request's
scheduling surface (`SchedulableRequest` in sglang_slo/engine/scheduler_interfaces.py) with
the same token layout: in the decode phase every token but the last output (the root) has
KV; after a preemption the engine recomputes prompt + outputs except the root.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from eval.metrics import Outcome, RequestRecord
from eval.workloads import GenRequest
from protos import messages as protos
from sglang_slo.engine.request import RequestPhases, RequestStatus

Status = RequestStatus
"""The engine's request status (WAITING also covers a call not arrived yet)."""


@dataclass(eq=False)
class SimRequest(RequestPhases):
    gen: GenRequest
    record: RequestRecord
    arrival_s: float = 0.0
    status: RequestStatus = RequestStatus.WAITING
    num_computed: int = 0
    """Tokens with KV in the target cache (prompt first, then outputs)."""
    decoded: int = 0
    """Output tokens committed."""
    cached_prefix: int = 0
    """Prompt tokens reused from the prefix cache: what was resident at arrival, reset to 0
    if the session prefix was evicted before the scheduler admitted the request."""
    decision: protos.Decision = protos.Decision.DEFER
    stage: int = 0
    """SLO stage the next output token belongs to."""
    first_token_s: float = 0.0
    num_preemptions: int = 0
    num_draft_computed: int = 0
    """Draft-cache tokens (not modelled; the scheduler resets it on preemption)."""
    dependents: list["SimRequest"] = field(default_factory=list)

    @property
    def rid(self) -> str:
        return self.gen.rid

    @property
    def slo(self) -> protos.Slo:
        return self.gen.slo

    @property
    def max_new_tokens(self) -> int:
        return max(self.gen.max_new_tokens, self.gen.output_tokens)

    @property
    def num_output_tokens(self) -> int:
        return self.decoded

    @property
    def num_tokens(self) -> int:
        return self.gen.prompt_tokens + self.decoded

    def arrived_message(self) -> protos.RequestArrived:
        return protos.RequestArrived(
            rid=self.rid, prompt_tokens=self.gen.prompt_tokens, max_new_tokens=self.max_new_tokens,
            slo=self.slo, arrival_s=self.arrival_s, session_id=self.gen.session_id,
            cached_prefix_tokens=self.cached_prefix)

    def finish(self, outcome: Outcome) -> None:
        self.status = RequestStatus.FINISHED
        self.record.outcome = outcome
