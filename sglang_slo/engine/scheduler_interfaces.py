"""What the batch scheduler needs from a request and from KV accounting (torch-free).

The scheduler (sglang_slo/engine/scheduler.py) is shared by the embedded engine, whose
requests are `Request` and whose KV is `BlockTables` (real block ids of real caches), and
the simulator (eval/), whose requests are `SimRequest` and whose KV is `KvBlocks` block
counts (through eval/sim_scheduler.py's `TargetOnlyKv`). Both sides satisfy these protocols structurally.
"""

from __future__ import annotations

from typing import Protocol

from protos import messages as protos


class KvAccounting(Protocol):
    """KV reservation in blocks of `block_size` tokens, per request id.

    `grow` is atomic: either the request can then hold `target_tokens` tokens in the target
    cache and `draft_tokens` in the draft cache (if the engine has one), or nothing changed.
    """

    @property
    def block_size(self) -> int:
        """Tokens per target-cache block."""
        ...

    def can_grow(self, rid: str, target_tokens: int, draft_tokens: int = 0) -> bool: ...

    def grow(self, rid: str, target_tokens: int, draft_tokens: int = 0) -> bool: ...

    def release(self, rid: str) -> None:
        """Free everything `rid` holds (finish, abort, preemption)."""
        ...


class SchedulableRequest(Protocol):
    """The request state the scheduler reads and writes.

    Written by the scheduler: `status` (WAITING <-> RUNNING), `decision`, and on preemption
    `num_computed = num_draft_computed = 0`, `num_preemptions += 1`.
    """

    rid: str
    status: object
    """A `RequestStatus`."""
    decision: protos.Decision
    num_computed: int
    """Tokens with KV in the target cache."""
    num_draft_computed: int
    num_preemptions: int

    @property
    def num_tokens(self) -> int:
        """Prompt + output tokens."""
        ...

    @property
    def num_output_tokens(self) -> int: ...

    @property
    def max_new_tokens(self) -> int: ...

    @property
    def prefill_target(self) -> int: ...

    @property
    def num_prefill_remaining(self) -> int: ...

    @property
    def is_prefilling(self) -> bool: ...

    @property
    def is_decoding(self) -> bool: ...

    @property
    def is_finished(self) -> bool: ...

    @property
    def is_best_effort(self) -> bool: ...

    @property
    def ttft_deadline_s(self) -> float: ...

    def next_token_deadline_s(self) -> float:
        """EDF key of decodes, seconds."""
        ...
