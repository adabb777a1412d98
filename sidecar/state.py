"""What the planner knows: one `ReqState` per in-flight request plus engine-wide state.

Life of a request as the planner sees it:

    WAITING (decision DEFER/PREEMPT, nothing prefilled beyond the cached prefix)
      -> ADMITTED (decision ADMIT or BEST_EFFORT; holds KV; prefill in chunks)
      -> DECODING (prompt fully prefilled; one decode entry per plan)
      -> gone (RequestFinished)

Deadlines follow SLOs-Serve: t0 = max(arrival + ttft, first-token time); token n (1-based)
is due at t0 + the sum of the TPOTs of tokens 2..n, each token priced by its stage, plus the
`ttft_s` allowance of every later stage that has begun by token n.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protos import messages as protos
from sidecar.cost_model import EngineLimits

Decision = protos.Decision
ADMITTED = (Decision.ADMIT, Decision.BEST_EFFORT)
"""Decisions under which a request holds (or is getting) KV and runs."""
_NOT_WAITING = (*ADMITTED, Decision.REJECT)


@dataclass(slots=True, eq=False)
class ReqState:
    """Planner-side state of one request."""

    rid: str
    prompt_tokens: int
    """Tokens to prefill before decoding: the prompt, plus after a preemption the output
    tokens whose KV must be recomputed (all but the last, which is the next decode root)."""
    max_new_tokens: int
    slo: protos.Slo
    arrival_s: float
    session_id: str = ""
    cached_prefix_tokens: int = 0
    prefilled: int = 0
    """Prompt tokens in KV (cached prefix included)."""
    decoded: int = 0
    """Output tokens committed."""
    first_token_s: float = 0.0
    """Engine time of the first output token (0 = not yet)."""
    stage: int = 0
    """Index of the current SLO stage."""
    decision: Decision = Decision.DEFER
    """Last admission decision in force (planner's or, after Resync, the engine's)."""
    stage_starts: list[int] = field(default_factory=list)
    """Output-token index (0-based) where each stage began; stage 0 starts at 0."""
    last_accepted: int = 0
    """Draft tokens accepted in the last iteration it speculated."""
    last_depth: int = 0
    """Depth of its last verified draft path."""
    seq: int = 0
    """Arrival sequence number (FCFS tiebreak, stable across Resync order)."""
    reported_prefilled: int = 0
    """`prefilled` as last reported by the engine (without in-flight projections)."""
    input_tokens: int = 0
    """The prompt length as it arrived."""

    @classmethod
    def from_arrived(cls, msg: protos.RequestArrived, seq: int = 0) -> "ReqState":
        # At least the last prompt token is always computed (it yields the first logits).
        cached = max(0, min(msg.cached_prefix_tokens, msg.prompt_tokens - 1))
        return cls(
            rid=msg.rid,
            prompt_tokens=msg.prompt_tokens,
            max_new_tokens=msg.max_new_tokens,
            slo=msg.slo,
            arrival_s=msg.arrival_s,
            session_id=msg.session_id,
            cached_prefix_tokens=cached,
            prefilled=cached,
            reported_prefilled=cached,
            input_tokens=msg.prompt_tokens,
            stage_starts=[0],
            seq=seq,
        )

    # ---- phase ------------------------------------------------------------------------

    @property
    def remaining_prefill(self) -> int:
        """Prompt tokens still to prefill."""
        return max(0, self.prompt_tokens - self.prefilled)

    @property
    def is_admitted(self) -> bool:
        """Admitted (holds or will hold KV) under an SLO or best effort."""
        return self.decision in ADMITTED

    @property
    def is_prefilled(self) -> bool:
        return self.prefilled >= self.prompt_tokens

    @property
    def is_decoding(self) -> bool:
        """Admitted and fully prefilled: needs a decode entry in every plan."""
        return self.prefilled >= self.prompt_tokens and self.decision in ADMITTED

    @property
    def is_waiting(self) -> bool:
        return self.decision not in ADMITTED

    @property
    def remaining_decode(self) -> int:
        return max(0, self.max_new_tokens - self.decoded)

    @property
    def kv_tokens(self) -> int:
        """KV slots held now (prefilled prompt + committed output)."""
        return self.prefilled + self.decoded

    @property
    def kv_tokens_final(self) -> int:
        """KV slots held at the end if it runs to max_new_tokens."""
        return self.prompt_tokens + self.max_new_tokens

    # ---- deadlines (seconds, engine clock) ----------------------------------------------

    @property
    def ttft_deadline_s(self) -> float:
        return self.arrival_s + self.slo.ttft_s

    @property
    def t0_s(self) -> float:
        """Anchor of the token-deadline schedule: max(TTFT deadline, first-token time)."""
        d = self.arrival_s + self.slo.ttft_s
        return d if self.first_token_s <= d else self.first_token_s

    def stage_tpot(self, stage: int) -> float:
        stages = self.slo.stages
        if not stages:
            return self.slo.tpot_s
        return stages[min(stage, len(stages) - 1)].tpot_s

    @property
    def tpot_now(self) -> float:
        """TPOT objective of the current stage, seconds."""
        return self.stage_tpot(self.stage)

    def token_deadline(self, n: int) -> float:
        """Deadline of output token n (1-based), seconds on the engine clock."""
        t = self.t0_s
        stages = self.slo.stages
        if not stages:
            return t + (n - 1) * self.slo.tpot_s if n > 1 else t
        if n <= 1:
            return t
        # Segments [start_k, start_{k+1}) of output-token indices (0-based) per stage.
        starts = self._stage_boundaries()
        last = len(stages) - 1
        for k, start in enumerate(starts):
            end = starts[k + 1] if k + 1 < len(starts) else None
            if start >= n:
                break
            if k > 0:
                t += stages[min(k, last)].ttft_s
            # tokens with 0-based index i in [max(start,1), min(end,n)) each add their tpot
            lo = start if start > 1 else 1
            hi = n if end is None or end > n else end
            if hi > lo:
                t += (hi - lo) * stages[min(k, last)].tpot_s
        return t

    def _stage_boundaries(self) -> list[int]:
        """0-based output-token index where each stage begins: observed for stages up to the
        current one; planned from `Stage.tokens` after it (never before the current position,
        since the engine has not reported the switch yet); unknown lengths end the list."""
        stages = self.slo.stages
        starts = self.stage_starts[: self.stage + 1] or [0]
        if len(starts) < self.stage + 1:  # (defensive) stages seen without a recorded start
            starts = starts + [self.decoded] * (self.stage + 1 - len(starts))
        k = self.stage
        if k >= len(stages) - 1 or stages[k].tokens <= 0:
            return starts
        starts = list(starts)
        pos = max(starts[k] + stages[k].tokens, self.decoded)
        starts.append(pos)
        for j in range(k + 1, len(stages) - 1):
            if stages[j].tokens <= 0:
                break
            pos += stages[j].tokens
            starts.append(pos)
        return starts

    def preempted(self, kv_kept: int = 0) -> None:
        """Its KV is gone (kept: `kv_kept` tokens of prefix cache): back to waiting, and the
        output so far must be prefilled again before it decodes (recompute, as SGLang's retract)."""
        self.decision = Decision.PREEMPT
        self.prompt_tokens = self.input_tokens + max(0, self.decoded - 1)
        self.prefilled = self.reported_prefilled = max(0, min(kv_kept, self.prompt_tokens - 1))

    @property
    def next_token_deadline_s(self) -> float:
        """Deadline of the next output token."""
        return self.token_deadline(self.decoded + 1)

    # ---- updates ----------------------------------------------------------------------

    def apply_progress(self, p: protos.RequestProgress) -> None:
        # Hot path (every report, every running request): each field read once.
        stage, prefilled, decoded = p.stage, p.prefilled, p.decoded
        if stage > self.stage:
            # The switch happened among this iteration's new tokens; date it at their start.
            del self.stage_starts[self.stage + 1 :]
            self.stage_starts.extend([self.decoded] * (stage - self.stage))
            self.stage = stage
        decoded_now = p.verified > 0 or decoded > self.decoded
        if decoded_now or p.prefill_tokens > 0:  # it ran this iteration
            if self.decision not in ADMITTED:
                self.decision = Decision.ADMIT  # the engine runs it (e.g. its fallback policy)
            if decoded_now and self.prompt_tokens != self.input_tokens:
                self.prompt_tokens = self.input_tokens  # recompute finished: it decodes again
        elif prefilled < self.reported_prefilled:
            # Reported prefill went backwards: the engine freed its KV (engine-side
            # preemption). It waits again; an admission must bring it back.
            self.preempted(prefilled)
        self.reported_prefilled = self.prefilled = prefilled
        self.decoded = decoded
        if p.first_token_s > 0:
            self.first_token_s = p.first_token_s
        if p.depth > 0:
            self.last_accepted = p.accepted
            self.last_depth = p.depth


@dataclass(slots=True)
class PlannerState:
    """Everything the planner knows about its engine and the requests in flight."""

    limits: EngineLimits
    """Engine limits (from the hardware profile until `EngineHello` arrives)."""
    requests: dict[str, ReqState] = field(default_factory=dict)
    """In-flight requests by rid, in arrival order."""
    now_s: float = 0.0
    """Latest engine time seen (report end, arrival, finish), seconds."""
    step: int = -1
    """Step of the last IterationReport (-1 = none yet)."""
    kv_free_tokens: int = 0
    """Free KV slots at the last report."""
    last_report: protos.IterationReport | None = None
    engine: str = ""
    """Engine kind from its hello ('embedded', 'sglang', 'sim')."""
    spec_modes: tuple[protos.SpecMode, ...] = (protos.SpecMode.NONE,)
    next_seq: int = 0
    mixed_forward: bool = True
    """The engine can run prefill chunks and decode tokens in one forward (EngineHello);
    False: a forward with prefill stalls every running decoder for its whole length."""

    def __post_init__(self):
        if not self.kv_free_tokens:
            self.kv_free_tokens = self.limits.kv_capacity_tokens

    def add(self, msg: protos.RequestArrived) -> ReqState:
        req = ReqState.from_arrived(msg, self.next_seq)
        self.next_seq += 1
        self.requests[msg.rid] = req
        return req

    def running(self) -> list[ReqState]:
        """Admitted requests, arrival order (prefilling or decoding)."""
        return [r for r in self.requests.values() if r.decision in ADMITTED]

    def decoding(self) -> list[ReqState]:
        """Admitted, fully prefilled requests: each needs a decode entry."""
        return [
            r for r in self.requests.values() if r.decision in ADMITTED and r.prefilled >= r.prompt_tokens
        ]

    def waiting(self) -> list[ReqState]:
        """Not admitted yet (or preempted), arrival order; rejected ones excluded."""
        return [r for r in self.requests.values() if r.decision not in _NOT_WAITING]

    @property
    def kv_reserved_tokens(self) -> int:
        """KV the engine has not yet allocated for admitted requests whose prefill is pending."""
        return sum(r.remaining_prefill for r in self.requests.values() if r.decision in ADMITTED)

    def kv_available(self, new_token_ratio: float, decode_clip: int = 4096) -> int:
        """KV slots left for new admissions: free slots minus what admitted requests still
        need for their prompts and `new_token_ratio` of their remaining output (SGLang's
        PrefillAdder reservation; output clipped at `decode_clip` tokens per request)."""
        prompt_left = output_left = 0
        admit, best = Decision.ADMIT, Decision.BEST_EFFORT
        for r in self.requests.values():
            d = r.decision
            if d is admit or d is best:
                rest = r.prompt_tokens - r.prefilled
                if rest > 0:
                    prompt_left += rest
                rest = r.max_new_tokens - r.decoded
                output_left += rest if rest < decode_clip else decode_clip
        return self.kv_free_tokens - prompt_left - int(output_left * new_token_ratio)

    @property
    def spec_enabled(self) -> bool:
        return self.limits.max_depth > 0 and any(m != protos.SpecMode.NONE for m in self.spec_modes)
