"""`fcfs`: SGLang's default scheduler, as a plan.

- Admission first-come-first-served while KV fits (prompt + `new_token_ratio` of the output
  reserved, SGLang's PrefillAdder rule); head-of-line blocking: the first request that does
  not fit stops admission (as SGLang does).
- Chunked prefill: at most `chunk_size` prompt tokens per iteration, mixed with decode
  (SGLang `--enable-mixed-chunk`); partially prefilled requests continue first.
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

    def preemptions(self, state: PlannerState, running: list[ReqState], waiting: list[ReqState], kv_left: int) -> list[ReqState]:
        """Running requests to preempt so waiting ones fit (fcfs: never)."""
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

    def plan(self, ctx: PlanContext) -> protos.Plan:
        cfg, state = self.config, ctx.state
        lim = state.limits
        k = self.spec_depth(state)
        cap = k + 1
        running = self.order(state.running())
        waiting = self.order(state.waiting())
        kv_left = state.kv_available(cfg.new_token_ratio)

        decisions: list[protos.AdmissionDecision] = []
        victims = self.preemptions(state, running, waiting, kv_left) if waiting else []
        if victims:
            gone = {id(v) for v in victims}
            running = [r for r in running if id(r) not in gone]
            for v in victims:
                decisions.append(protos.AdmissionDecision(v.rid, Decision.PREEMPT))
                kv_left += v.kv_tokens + v.remaining_prefill + int(min(v.remaining_decode, 4096) * cfg.new_token_ratio)

        decode = [protos.DecodeEntry(r.rid, 1.0, cap, k, 1) for r in running if r.prefilled >= r.prompt_tokens]
        n_decode = len(decode)
        budget = max(lim.max_batch_tokens, n_decode)
        # Prefill gets what the full fixed-k verify leaves, at most one chunk; the engine
        # guarantees each decode entry its root token, so the invariant uses 1 per entry.
        left = min(cfg.chunk_size, budget - n_decode * cap, budget - n_decode)
        chunks: list[protos.PrefillChunk] = []
        for r in running:
            if left <= 0:
                break
            rest = r.prompt_tokens - r.prefilled
            if rest > 0:
                n = rest if rest < left else left
                chunks.append(protos.PrefillChunk(r.rid, n))
                left -= n

        n_running = len(running)
        max_running = cfg.max_running or lim.max_batch_tokens
        for r in waiting:
            if r.prompt_tokens >= lim.kv_capacity_tokens:
                decisions.append(protos.AdmissionDecision(r.rid, Decision.REJECT))
                continue
            if left <= 0 or n_running >= max_running:
                break
            need = r.prompt_tokens - r.prefilled + int(min(r.remaining_decode, 4096) * cfg.new_token_ratio)
            if need > kv_left:
                break  # head-of-line: SGLang does not skip ahead
            decisions.append(protos.AdmissionDecision(r.rid, Decision.ADMIT))
            kv_left -= need
            n_running += 1
            rest = r.prompt_tokens - r.prefilled
            n = rest if rest < left else left
            chunks.append(protos.PrefillChunk(r.rid, n))
            left -= n

        return protos.Plan(
            step=ctx.step,
            valid_until_s=0.0,
            token_budget=budget,
            prefill=chunks,
            decode=decode,
            decisions=decisions,
            spec_depth=k if lim.depth_tiers else -1,
        )


def make(**overrides) -> FcfsPolicy:
    return FcfsPolicy(build_config(FcfsConfig, overrides, "fcfs"))
