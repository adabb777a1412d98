"""`fcfs`: SGLang's default scheduler, as a plan.

- Admission first-come-first-served while KV fits (prompt + `new_token_ratio` of the output
  reserved, SGLang's PrefillAdder rule); head-of-line blocking: the first request that does
  not fit stops admission (as SGLang does).
- Prefill-first, non-mixed (SGLang's default; reference sglang-0.5.23-internals.md §1.2):
  an iteration is EITHER a prefill (extend) batch OR a decode batch. Whenever prompt tokens
  can be scheduled (the in-flight chunked request first, then waiting requests FCFS), the
  plan holds only prefill chunks, at most `chunk_size` tokens, and no decode entries: the
  running requests wait that iteration. Only the last admitted request is cut by the chunk
  budget, so at most one request is partially prefilled at a time.
- `mixed_chunk=True` models `--enable-mixed-chunk` instead: the prefill chunk shares the
  iteration with the whole running batch, whose rows then do not speculate (§2.3: decode rows
  of a mixed batch do not speculate; several SGLang versions even switch mixed chunk off
  under EAGLE), and the chunk budget shrinks by one token per decoding request.
- Decode iterations: every running request decodes with the same fixed speculation depth k
  (chain, width 1; k = 0: speculation off), clipped to the engine's limits and depth tiers.
  SGLang's usual EAGLE setting is a chain of k = 3 (topk 1, 4 draft tokens).
- Token budget = the engine's max_batch_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from protos import messages as protos
from sidecar.policies.base import PlanContext, Policy, build_config
from sidecar.state import PlannerState, ReqState

Decision = protos.Decision


@dataclass(frozen=True)
class FcfsConfig:
    chunk_size: int = 8192
    """Most prompt tokens prefilled per iteration (SGLang chunked_prefill_size). SGLang's
    default is 8192 on 35-160 GiB GPUs such as H100/A100-80GB (server_args.py,
    `_handle_gpu_memory_settings` / `_handle_chunked_prefill_size`)."""
    mixed_chunk: bool = False
    """True: SGLang `--enable-mixed-chunk` (prefill chunk + non-speculative decodes in one
    iteration); False: SGLang's default, an iteration is prefill or decode, prefill first."""
    spec_k: int = 3
    """Fixed speculation depth for every running request (0 = off)."""
    new_token_ratio: float = 0.4
    """Fraction of a request's remaining max_new_tokens reserved in KV when admitting it."""
    max_running: int = 0
    """Most admitted requests at once (0 = max_batch_tokens: one token each)."""

    def __post_init__(self):
        if self.chunk_size < 1 or self.spec_k < 0 or not 0.0 <= self.new_token_ratio <= 1.0 or self.max_running < 0:
            raise ValueError(f"bad fcfs/priority config: {self}")


class FcfsPolicy(Policy):
    """First come, first served; fixed chunked prefill; fixed speculation depth."""

    name = "fcfs"

    def __init__(self, config: FcfsConfig | None = None):
        self.config = config or FcfsConfig()

    # ---- hooks that `priority` overrides --------------------------------------------------

    def order(self, reqs: list[ReqState]) -> list[ReqState]:
        """Service order (input is arrival order)."""
        return reqs

    def make_room(self, waiting: ReqState, deficit: int, running: list[ReqState], gone: set[str]) -> list[ReqState]:
        """Running requests to preempt so that `waiting` fits (`deficit` KV tokens short);
        [] if it cannot or should not. fcfs never preempts."""
        return []

    # ---- plan -----------------------------------------------------------------------------

    def spec_depth(self, state: PlannerState) -> int:
        """The fixed k, clipped to what the engine can run."""
        lim = state.limits
        if not state.spec_enabled:
            return 0
        k = min(self.config.spec_k, lim.max_depth)
        if lim.depth_tiers and k > 0:
            fitting = [d for d in lim.depth_tiers if d <= k]
            k = fitting[-1] if fitting else 0
        return k

    def reservation(self, r: ReqState) -> int:
        """KV tokens a request still needs: rest of its prompt + new_token_ratio of its output."""
        out = r.max_new_tokens - r.decoded
        prompt = r.prompt_tokens - r.prefilled
        return (prompt if prompt > 0 else 0) + int((out if out < 4096 else 4096) * self.config.new_token_ratio)

    def plan(self, ctx: PlanContext) -> protos.Plan:
        cfg, state = self.config, ctx.state
        lim = state.limits
        k = self.spec_depth(state)
        running = self.order(state.running())
        kv_left = state.kv_available(cfg.new_token_ratio)

        n_decode = 0
        for r in running:
            if r.prefilled >= r.prompt_tokens:
                n_decode += 1
        cap = lim.max_batch_tokens
        # Prefill first: the in-flight chunked request(s), then admissions, up to one chunk.
        # Mixed chunk: every decoding request's root comes out of the chunk budget (SGLang's
        # PrefillAdder `mixed_with_decode_tokens`).
        left = min(cfg.chunk_size, cap) - (n_decode if cfg.mixed_chunk else 0)
        chunks: dict[str, int] = {}  # rid -> tokens, in service order
        for r in running:
            if left <= 0:
                break
            rest = r.prompt_tokens - r.prefilled
            if rest > 0:
                n = rest if rest < left else left
                chunks[r.rid] = n
                left -= n

        decisions: list[protos.AdmissionDecision] = []
        gone: set[str] = set()  # preempted this plan
        n_running = len(running)
        max_running = cfg.max_running or lim.max_batch_tokens
        for r in self.order(state.waiting()):
            if r.prompt_tokens >= lim.kv_capacity_tokens:
                decisions.append(protos.AdmissionDecision(r.rid, Decision.REJECT))
                continue
            if left <= 0 or n_running >= max_running:
                break
            need = self.reservation(r)
            if need > kv_left:
                victims = self.make_room(r, need - kv_left, running, gone)
                if not victims:
                    break  # head-of-line: SGLang does not skip ahead
                for v in victims:
                    gone.add(v.rid)
                    decisions.append(protos.AdmissionDecision(v.rid, Decision.PREEMPT))
                    kv_left += v.prefilled + v.decoded + self.reservation(v)
                    left += chunks.pop(v.rid, 0)
                    n_running -= 1
            decisions.append(protos.AdmissionDecision(r.rid, Decision.ADMIT))
            kv_left -= need
            n_running += 1
            rest = r.prompt_tokens - r.prefilled
            n = rest if rest < left else left
            chunks[r.rid] = n
            left -= n

        if chunks and not cfg.mixed_chunk:
            decode: list[protos.DecodeEntry] = []  # a prefill batch: running requests wait
        else:
            d = 0 if chunks else k  # decode rows of a mixed batch do not speculate
            decode = [
                protos.DecodeEntry(r.rid, 1.0, d + 1, d, 1)
                for r in running
                if r.prefilled >= r.prompt_tokens and (not gone or r.rid not in gone)
            ]
        return protos.Plan(
            step=ctx.step,
            valid_until_s=0.0,
            token_budget=max(cap, len(decode)),  # a root per decode entry even past the cap
            prefill=[protos.PrefillChunk(rid, n) for rid, n in chunks.items()],
            decode=decode,
            decisions=decisions,
            spec_depth=(0 if chunks else k) if lim.depth_tiers else -1,
        )


def make(**overrides) -> FcfsPolicy:
    return FcfsPolicy(build_config(FcfsConfig, overrides, "fcfs"))
