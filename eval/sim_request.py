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
from sglang_slo.engine.request import RequestStatus

Status = RequestStatus
"""The engine's request status (WAITING also covers a call not arrived yet)."""


@dataclass(eq=False)
class SimRequest:
    gen: GenRequest
    record: RequestRecord
    arrival_s: float = 0.0
    status: RequestStatus = RequestStatus.WAITING
    computed: int = 0
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
    def num_computed(self) -> int:
        """The scheduler's name for `computed`."""
        return self.computed

    @num_computed.setter
    def num_computed(self, value: int) -> None:
        self.computed = value

    @property
    def max_new_tokens(self) -> int:
        return max(self.gen.max_new_tokens, self.gen.output_tokens)

    @property
    def num_output_tokens(self) -> int:
        return self.decoded

    @property
    def num_tokens(self) -> int:
        return self.gen.prompt_tokens + self.decoded

    @property
    def prefill_target(self) -> int:
        """Tokens that must have KV before decoding: the prompt, or after a preemption
        everything but the root."""
        return self.gen.prompt_tokens + self.decoded - 1 if self.decoded else self.gen.prompt_tokens

    @property
    def num_prefill_remaining(self) -> int:
        return max(0, self.prefill_target - self.computed)

    @property
    def is_prefilling(self) -> bool:
        return self.computed < self.prefill_target

    @property
    def is_decoding(self) -> bool:
        return self.status is RequestStatus.RUNNING and not self.is_prefilling

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def is_best_effort(self) -> bool:
        return self.slo.best_effort or self.decision == protos.Decision.BEST_EFFORT

    @property
    def ttft_deadline_s(self) -> float:
        return self.arrival_s + self.slo.ttft_s

    def next_token_deadline_s(self) -> float:
        """When the next output token is due (the engine's EDF key), seconds."""
        if not self.decoded:
            return self.ttft_deadline_s
        return max(self.ttft_deadline_s, self.first_token_s) + self.decoded * self.slo.tpot_s

    def arrived_message(self) -> protos.RequestArrived:
        return protos.RequestArrived(
            rid=self.rid, prompt_tokens=self.gen.prompt_tokens, max_new_tokens=self.max_new_tokens,
            slo=self.slo, arrival_s=self.arrival_s, session_id=self.gen.session_id,
            cached_prefix_tokens=self.cached_prefix)

    def finish(self, outcome: Outcome) -> None:
        self.status = RequestStatus.FINISHED
        self.record.outcome = outcome
