"""A request inside the simulated engine: the generated request plus its progress.

Token layout mirrors the embedded engine (sglang_slo/engine/request.py): in the decode
phase every token but the last output (the root) has KV; after a preemption the engine
recomputes prompt + outputs except the root before decoding again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from eval.metrics import Outcome, RequestRecord
from eval.workloads import GenRequest
from protos import messages as protos


class Status(enum.Enum):
    PENDING = enum.auto()  # not arrived yet (closed-loop call waiting for its predecessor)
    WAITING = enum.auto()  # queued, no KV
    RUNNING = enum.auto()  # holds KV; prefilling or decoding
    DONE = enum.auto()


@dataclass(eq=False)
class SimRequest:
    gen: GenRequest
    record: RequestRecord
    arrival_s: float = 0.0
    status: Status = Status.PENDING
    computed: int = 0
    """Tokens with KV in the target cache (prompt first, then outputs)."""
    decoded: int = 0
    """Output tokens committed."""
    cached_prefix: int = 0
    """Prompt tokens found in the prefix cache at arrival."""
    decision: protos.Decision = protos.Decision.DEFER
    stage: int = 0
    """SLO stage the next output token belongs to."""
    first_token_s: float = 0.0
    preemptions: int = 0
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
    def prefill_target(self) -> int:
        """Tokens that must have KV before decoding: the prompt, or after a preemption
        everything but the root."""
        return self.gen.prompt_tokens + self.decoded - 1 if self.decoded else self.gen.prompt_tokens

    @property
    def prefill_remaining(self) -> int:
        return max(0, self.prefill_target - self.computed)

    @property
    def is_prefilling(self) -> bool:
        return self.computed < self.prefill_target

    @property
    def is_decoding(self) -> bool:
        return self.status is Status.RUNNING and not self.is_prefilling

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
        self.status = Status.DONE
        self.record.outcome = outcome
