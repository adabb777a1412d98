"""A request inside the embedded engine: its tokens, sampling parameters, SLO and progress.

Token layout of a request (`all_ids = prompt_ids + output_ids`):

    [ prompt ............................ | outputs ............... ]
    [ in target KV (num_computed) ..................... | root ]      (decode phase)

In the decode phase every token but the last (the "root", sampled last iteration) has KV
in the target cache; the next forward feeds the root plus any draft tree under it. The
draft model keeps its own cache (`num_draft_computed` tokens) and catches up lazily.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from protos import messages as protos


class InvalidRequestError(ValueError):
    """Bad input from a client (empty or too long prompt, invalid sampling parameters).

    The HTTP server maps it to a 400 response; the engine state is unchanged.
    """


class RequestStatus(enum.Enum):
    WAITING = enum.auto()  # queued, no KV (new, or preempted and to be recomputed)
    RUNNING = enum.auto()  # holds KV; prefilling or decoding
    FINISHED = enum.auto()  # done; KV freed


@dataclass(slots=True)
class SamplingParams:
    """How to generate tokens for one request."""

    max_new_tokens: int = 128
    """Most output tokens (>= 1)."""
    temperature: float = 0.0
    """0 = greedy; > 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    stop_token_ids: tuple[int, ...] = ()
    """Generation stops after emitting any of these (the token is kept in the output)."""
    ignore_eos: bool = False
    """Do not stop at the model's EOS token."""
    seed: int | None = None
    """Seed of the request's own random generator (None = nondeterministic)."""

    def __post_init__(self):
        self.stop_token_ids = tuple(self.stop_token_ids)

    def validate(self) -> None:
        """Raise `InvalidRequestError` naming the first bad field."""
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise InvalidRequestError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _finite(self.temperature) or self.temperature < 0:
            raise InvalidRequestError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _finite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise InvalidRequestError(f"seed must be an integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")


class RequestPhases:
    """Phase, deadline and service-tier properties of a request, derived from its counters.

    One definition for the engine's `Request` and the simulator's `SimRequest` (the
    scheduler they share reads these). Needs: `num_tokens`, `num_output_tokens`,
    `num_computed`, `status`, `slo`, `decision`, `arrival_s`, `first_token_s`.
    """

    __slots__ = ()

    @property
    def prefill_target(self) -> int:
        """Tokens that must be in target KV before decoding: the prompt, or (after a
        preemption) everything but the root."""
        return self.num_tokens - 1 if self.num_output_tokens else self.num_tokens

    @property
    def num_prefill_remaining(self) -> int:
        return max(0, self.prefill_target - self.num_computed)

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed < self.prefill_target

    @property
    def is_decoding(self) -> bool:
        return self.status is RequestStatus.RUNNING and not self.is_prefilling

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def is_best_effort(self) -> bool:
        """Asked for best-effort service, or demoted to it by the planner."""
        return self.slo.best_effort or self.decision == protos.Decision.BEST_EFFORT

    @property
    def ttft_deadline_s(self) -> float:
        return self.arrival_s + self.slo.ttft_s

    def next_token_deadline_s(self) -> float:
        """When the next output token is due (SLOs-Serve's deadline schedule), seconds."""
        if not self.num_output_tokens:
            return self.ttft_deadline_s
        t0 = max(self.ttft_deadline_s, self.first_token_s)
        return t0 + self.num_output_tokens * self.slo.tpot_s


@dataclass(eq=False)
class Request(RequestPhases):
    """One generation request and its progress; owned by the engine's scheduler."""

    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    slo: protos.Slo
    arrival_s: float
    """Engine clock at arrival, seconds."""
    session_id: str = ""
    output_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed: int = 0
    """Tokens of `all_ids` whose KV is in the target cache."""
    num_draft_computed: int = 0
    """Tokens of `all_ids` whose KV is in the draft cache."""
    decision: protos.Decision = protos.Decision.DEFER
    """Last admission decision applied (plan or fallback)."""
    first_token_s: float = 0.0
    finish_reason: protos.FinishReason | None = None
    finish_message: str = ""
    num_preemptions: int = 0
    # Speculation statistics (whole lifetime).
    num_verifies: int = 0
    num_accepted: int = 0
    generator: object = None
    """torch.Generator of this request (created by the runner when it first samples)."""

    # ---- derived quantities ------------------------------------------------------------

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def max_new_tokens(self) -> int:
        return self.params.max_new_tokens

    @property
    def num_prefilled_prompt(self) -> int:
        """Prompt tokens prefilled (what the protocol calls `prefilled`)."""
        return min(self.num_computed, len(self.prompt_ids))

    def arrived_message(self) -> protos.RequestArrived:
        return protos.RequestArrived(
            rid=self.rid,
            prompt_tokens=len(self.prompt_ids),
            max_new_tokens=self.params.max_new_tokens,
            slo=self.slo,
            arrival_s=self.arrival_s,
            session_id=self.session_id,
        )

    def snapshot(self) -> protos.RequestSnapshot:
        return protos.RequestSnapshot(
            arrived=self.arrived_message(),
            prefilled=self.num_prefilled_prompt,
            decoded=len(self.output_ids),
            first_token_s=self.first_token_s,
            decision=self.decision,
        )
