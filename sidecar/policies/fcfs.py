"""`fcfs`: SGLang's default scheduler, as a plan.

- Admission first-come-first-served while KV fits (prompt + `new_token_ratio` of the output
  reserved, SGLang's PrefillAdder rule); head-of-line blocking: the first request that does
  not fit stops admission (as SGLang does).
- Chunked prefill: at most `chunk_size` prompt tokens per iteration, mixed with decode
  (SGLang `--enable-mixed-chunk`); partially prefilled requests continue first. Prefill has
  priority over draft tokens, as SGLang runs a pending prefill batch before the next decode.
- Every running request decodes with the same fixed speculation depth k (chain, width 1;
  k = 0: speculation off), clipped to the engine's limits and depth tiers.
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
    chunk_size: int = 2048
    """Most prompt tokens prefilled per iteration (SGLang chunked_prefill_size)."""
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
        cap = k + 1
        running = self.order(state.running())
        kv_left = state.kv_available(cfg.new_token_ratio)

        n_decode = 0
        for r in running:
            if r.prefilled >= r.prompt_tokens:
                n_decode += 1
        budget = max(lim.max_batch_tokens, n_decode)
        # Prefill first (SGLang runs a pending prefill batch before decoding), at most one
        # chunk; every decode entry keeps its root token, and the engine fills the rest of
        # the budget with draft nodes up to each entry's k+1 cap.
        left = min(cfg.chunk_size, budget - n_decode)
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

        decode = [
            protos.DecodeEntry(r.rid, 1.0, cap, k, 1)
            for r in running
            if r.prefilled >= r.prompt_tokens and (not gone or r.rid not in gone)
        ]
        return protos.Plan(
            step=ctx.step,
            valid_until_s=0.0,
            token_budget=budget,
            prefill=[protos.PrefillChunk(rid, n) for rid, n in chunks.items()],
            decode=decode,
            decisions=decisions,
            spec_depth=k if lim.depth_tiers else -1,
        )


def make(**overrides) -> FcfsPolicy:
    return FcfsPolicy(build_config(FcfsConfig, overrides, "fcfs"))
