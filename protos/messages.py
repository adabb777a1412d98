"""The wire protocol between engines and the planner sidecar.

Every message that crosses the engine <-> planner boundary is defined here and nowhere else.
Encoding: msgspec msgpack, `array_like=True` (positional, compact), `omit_defaults=True`,
`gc=False`, tagged structs decoded by one typed `Decoder` over the `Message` union.

Rules (append-only evolution):
- New fields go at the END of a struct and carry a default; never reorder or remove fields.
- Changing a field's meaning or order bumps `PROTOCOL_VERSION`.
- Times are seconds (float) on the engine's monotonic clock and are suffixed `_s`.
- Request ids are strings chosen by the engine (`rid`).

Flow (one engine per planner connection; ROUTER on the planner, DEALER on the engine):
    engine -> planner: EngineHello, then RequestArrived / IterationReport / RequestFinished /
                       Resync (after a planner restart) in any order
    planner -> engine: PlannerWelcome (answer to EngineHello), then Plan messages
"""

from __future__ import annotations

import enum

import msgspec

PROTOCOL_VERSION = 1

__all__ = [
    "PROTOCOL_VERSION", "SpecMode", "Decision", "FinishReason", "Stage", "Slo",
    "EngineHello", "PlannerWelcome", "RequestArrived", "RequestProgress", "IterationReport",
    "RequestFinished", "RequestSnapshot", "Resync", "PrefillChunk", "DecodeEntry",
    "AdmissionDecision", "Plan", "Message", "ProtocolError", "encode", "decode", "check_hello",
]


class _Wire(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag_field="t"):
    """Base of every wire struct (not itself on the wire)."""


# ----------------------------------------------------------------------------------------
# Enums (IntEnum: compact on the wire, readable in code)
# ----------------------------------------------------------------------------------------


class SpecMode(enum.IntEnum):
    """What kind of speculation an engine can run."""

    NONE = 0  # plain autoregressive decoding
    CHAIN = 1  # one draft sequence per request (EAGLE topk=1, SpecServe)
    TREE = 2  # per-request draft trees with tree-attention verify (AdaServe)


class Decision(enum.IntEnum):
    """The planner's admission decision for a waiting (or running) request."""

    ADMIT = 0  # schedule under its SLO
    DEFER = 1  # keep waiting; decide again later
    REJECT = 2  # the engine should fail it now (overload, infeasible SLO)
    BEST_EFFORT = 3  # run only on leftover budget and free KV; may be preempted
    PREEMPT = 4  # free its KV now and put it back in the waiting queue (recompute later)


class FinishReason(enum.IntEnum):
    STOP = 0  # EOS or a stop string
    LENGTH = 1  # max_new_tokens reached
    ABORT = 2  # client disconnect or explicit abort
    ERROR = 3  # engine-side error (e.g. NaN logits)
    REJECTED = 4  # refused by admission control


# ----------------------------------------------------------------------------------------
# SLO description
# ----------------------------------------------------------------------------------------


class Stage(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One stage of a multi-stage request (e.g. reasoning 'think' then 'answer')."""

    tpot_s: float
    """Per-token deadline spacing within this stage, seconds."""
    tokens: int = 0
    """Expected output tokens in this stage; 0 = unknown (stage ends at a marker or the end)."""
    ttft_s: float = 0.0
    """Extra allowance before the first token of this stage, seconds (0 = none)."""


class Slo(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """A request's latency objectives.

    Token n (1-based) of a single-stage request is due at t0 + (n - 1) * tpot_s, where
    t0 = max(arrival + ttft_s, actual first-token time) (SLOs-Serve's deadline schedule).
    With `stages`, the spacing follows the stage the token belongs to.
    """

    ttft_s: float
    """Time to first token objective, seconds from arrival."""
    tpot_s: float
    """Time per output token objective, seconds (the first stage's if `stages` is set)."""
    stages: list[Stage] = []
    """Optional per-stage objectives; empty = one stage with `tpot_s`."""
    slo_class: str = ""
    """Name of the SLO class (coding, chat, tool-call, reasoning, ...); metrics group by it."""
    priority: int = 0
    """SGLang-style priority; larger = more important (used by `priority` policy)."""
    best_effort: bool = False
    """Request explicitly asked for best-effort service (no SLO guarantee)."""


# ----------------------------------------------------------------------------------------
# Handshake
# ----------------------------------------------------------------------------------------


class EngineHello(_Wire, tag="hello"):
    """First message of an engine; the planner answers with `PlannerWelcome`."""

    protocol_version: int
    engine: str
    """Engine kind: 'embedded', 'sglang', 'sim'."""
    spec_modes: list[SpecMode]
    """Speculation modes the engine can execute."""
    max_batch_tokens: int
    """Most tokens one forward may carry (prefill + verify)."""
    kv_capacity_tokens: int
    """Total KV cache slots (tokens) of the target model."""
    max_depth: int = 0
    """Deepest draft the engine can run (0 = no speculation)."""
    max_width: int = 1
    """Widest beam per tree level (1 = chains only)."""
    depth_tiers: list[int] = []
    """If non-empty, the only speculation depths the engine can run (pre-captured graphs)."""
    kv_block_tokens: int = 16
    """Tokens per KV block (allocation granularity)."""
    config_hash: str = ""
    """Hash of the engine's model + SLO-class config; the planner logs it and may refuse."""
    clock_s: float = 0.0
    """Engine clock at send time, seconds (lets a planner check clock agreement)."""
    mixed_forward: bool = True
    """Whether one forward can carry prefill chunks and running requests' decode tokens
    together. False (SGLang without --enable-mixed-chunk): a forward with prefill runs no
    decode step, so every running decoder waits out the whole prefill forward."""


class PlannerWelcome(_Wire, tag="welcome"):
    protocol_version: int
    accepted: bool
    policy: str
    """Name of the policy the planner runs."""
    reason: str = ""
    """Why the planner refused, when `accepted` is False."""
    config_hash: str = ""


# ----------------------------------------------------------------------------------------
# Engine -> planner events
# ----------------------------------------------------------------------------------------


class RequestArrived(_Wire, tag="arrived"):
    rid: str
    prompt_tokens: int
    max_new_tokens: int
    slo: Slo
    arrival_s: float
    session_id: str = ""
    """Agent loop id: calls of one tool-calling session share it (and usually a prefix)."""
    cached_prefix_tokens: int = 0
    """Prompt tokens already in the engine's prefix cache (no prefill needed)."""


class RequestProgress(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """What one request did in one iteration."""

    rid: str
    prefilled: int
    """Prompt tokens prefilled so far (cumulative)."""
    decoded: int
    """Output tokens committed so far (cumulative)."""
    prefill_tokens: int = 0
    """Prompt tokens processed in this iteration."""
    verified: int = 0
    """Draft tokens verified this iteration (tree nodes or chain length, excluding root)."""
    accepted: int = 0
    """Draft tokens accepted this iteration (excluding the bonus/correction token)."""
    depth: int = 0
    """Depth of the longest verified draft path this iteration."""
    draft_conf: float = 0.0
    """Mean draft probability along the verified path (0 when not speculating)."""
    stage: int = 0
    """Index of the request's current SLO stage."""
    first_token_s: float = 0.0
    """Time the first output token was produced (0 = not yet)."""


class IterationReport(_Wire, tag="report"):
    """Sent by the engine after each iteration (forward) completes."""

    step: int
    start_s: float
    end_s: float
    plan_step: int
    """`Plan.step` of the plan applied; -1 when the local fallback policy ran."""
    prefill_tokens: int
    """Prompt tokens in this forward."""
    verify_tokens: int
    """Decode + verify tokens in this forward (roots included)."""
    draft_steps: int
    """Sequential draft-model steps run before the verify forward."""
    context_tokens: int
    """Sum over batched requests of KV context attended (tokens)."""
    kv_free_tokens: int
    progress: list[RequestProgress] = []
    waiting: int = 0
    """Requests queued but not yet running."""
    forward_s: float = 0.0
    """Measured model time (draft + verify), seconds; `end_s - start_s` includes overhead."""


class RequestFinished(_Wire, tag="finished"):
    rid: str
    reason: FinishReason
    decoded: int
    finish_s: float
    message: str = ""


class RequestSnapshot(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """Everything a fresh planner needs to know about one in-flight request."""

    arrived: RequestArrived
    prefilled: int = 0
    decoded: int = 0
    first_token_s: float = 0.0
    stage: int = 0
    decision: Decision = Decision.DEFER
    """The last decision the engine applied for it."""


class Resync(_Wire, tag="resync"):
    """Sent after a (re)handshake: the complete in-flight state, replacing the planner's."""

    now_s: float
    step: int
    requests: list[RequestSnapshot] = []
    kv_free_tokens: int = 0


# ----------------------------------------------------------------------------------------
# Planner -> engine
# ----------------------------------------------------------------------------------------


class PrefillChunk(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    rid: str
    tokens: int
    """Prompt tokens to prefill for this request in the iteration."""


class DecodeEntry(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """Speculation parameters of one running request (AdaServe's per-request tree)."""

    rid: str
    min_tokens: float = 1.0
    """A_i: expected committed tokens the request needs this iteration (root counts 1.0)."""
    tree_cap: int = 1
    """Most tree nodes (verify tokens, root included) this request may use."""
    depth: int = 0
    """Draft depth (0 = no speculation)."""
    width: int = 1
    """Beam width per level (1 = chain)."""


class AdmissionDecision(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    rid: str
    decision: Decision


class Plan(_Wire, tag="plan"):
    """The planner's decisions for the engine's next iteration(s)."""

    step: int
    """First engine step this plan is meant for."""
    valid_until_s: float
    """Engine clock after which this plan is stale and the fallback policy runs."""
    token_budget: int
    """B: most tokens in the forward (prefill chunks + all verify tokens)."""
    prefill: list[PrefillChunk] = []
    """Prefill chunks in priority order."""
    decode: list[DecodeEntry] = []
    """Running requests in priority order with their speculation parameters."""
    decisions: list[AdmissionDecision] = []
    spec_depth: int = -1
    """Batch-wide depth for engines with depth tiers (-1 = per-request entries rule)."""
    plan_latency_s: float = 0.0
    """How long the planner took to compute this plan."""
    based_on_step: int = -1
    """Last `IterationReport.step` the planner had seen when planning."""
    arrival_tokens: int = 0
    """Prompt tokens of requests that arrived after this plan was made (the planner has not
    seen them) the engine may prefill at once, its own way, while the plan is in force; 0 =
    they wait for a plan that knows them. Lets a fresh arrival skip the plan pipeline's lag
    when the planner judged the running decoders can absorb a prefill now."""


Message = EngineHello | PlannerWelcome | RequestArrived | IterationReport | RequestFinished | Resync | Plan

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


class ProtocolError(ValueError):
    """A frame that is not a valid message of this protocol version."""


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(frame: bytes) -> Message:
    """Decode one frame; raises `ProtocolError` (never anything else) on bad input."""
    try:
        return _decoder.decode(frame)
    # msgspec lets a string field's invalid UTF-8 escape as UnicodeDecodeError.
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as e:
        raise ProtocolError(f"undecodable frame ({len(frame)} bytes): {e}") from None


def check_hello(hello: EngineHello) -> str:
    """Return '' if the planner can serve this engine, else the reason it cannot."""
    if hello.protocol_version != PROTOCOL_VERSION:
        return f"protocol version {hello.protocol_version} != planner's {PROTOCOL_VERSION}"
    if hello.max_batch_tokens <= 0 or hello.kv_capacity_tokens <= 0:
        return "max_batch_tokens and kv_capacity_tokens must be positive"
    return ""
