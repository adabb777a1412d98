"""`specserve`: SpecServe/AdaSpec (SoCC '25), load-adaptive chain speculation (papers.md section 2).

- Admission and prefill as SGLang's default: FCFS while KV fits, chunked prefill.
- Batch proposal length k in {0..K} maximizing G(k) = (sum_i E_i(k) + n) / T(k) with the
  per-request acceptance estimates and the cost model (k = 0: speculation off under load),
  under the SLO guard (no k whose predicted iteration time exceeds the tightest TPOT).
- Confidence-prior trimming: the lowest path-probability tail drafts are dropped while G
  does not fall, giving per-request chain lengths k_i <= k.
"""

from __future__ import annotations

from dataclasses import dataclass

from protos import messages as protos
from sidecar.policies.base import PlanContext, Policy, build_config
from sidecar.policies.engine_shapes import covering_budget, snap_depth
from sidecar.policies.prefill_packing import pack
from sidecar.policies.spec_efficiency import choose_length, cumulative


@dataclass(frozen=True)
class SpecServeConfig:
    chunk_size: int = 2048
    """Most prompt tokens per iteration (SGLang chunked_prefill_size)."""
    max_k: int = 8
    """Largest proposal length considered (AdaSpec's K)."""
    slo_guard: bool = True
    """Reject k whose predicted iteration time exceeds the tightest TPOT."""
    trim: bool = True
    """Per-request confidence-prior trimming."""
    new_token_ratio: float = 0.4
    """Share of remaining output reserved in KV on admission."""

    def __post_init__(self):
        if self.chunk_size < 1 or self.max_k < 0 or not 0.0 <= self.new_token_ratio <= 1.0:
            raise ValueError(f"specserve: bad config {self}")


class SpecServePolicy(Policy):
    name = "specserve"

    def __init__(self, config: SpecServeConfig | None = None):
        self.config = config or SpecServeConfig()

    def plan(self, ctx: PlanContext) -> protos.Plan:
        cfg, state = self.config, ctx.state
        lim = state.limits
        running = state.running()
        decoding = [r for r in running if r.prefilled >= r.prompt_tokens]
        n = len(decoding)

        # Prefill first (its size enters T(k)): FCFS chunks within the batch limit.
        packing = pack(
            running + state.waiting(),
            max(0, lim.max_batch_tokens - n),
            state.kv_available(cfg.new_token_ratio),
            cfg.new_token_ratio,
            chunk_cap=cfg.chunk_size,
            kv_capacity=lim.kv_capacity_tokens,
        )
        prefill = packing.used
        k_max = snap_depth(cfg.max_k, lim, state.spec_enabled)
        # Verify tokens must fit the batch limit next to the prefill chunk.
        room = lim.max_batch_tokens - prefill
        while k_max > 0 and n * (k_max + 1) > room:
            k_max -= 1
        allowed = [d for d in lim.depth_tiers if d <= k_max] if lim.depth_tiers else None
        context = sum(r.prefilled + r.decoded for r in decoding)
        cost = ctx.cost

        def time_of(verify: int, steps: int) -> float:
            return cost.iteration_time(prefill, verify, steps, context, max(0, verify - n))

        guard = min((r.tpot_now for r in decoding), default=float("inf")) if cfg.slo_guard else float("inf")
        alphas = [ctx.acceptance.alphas(r.rid, k_max) for r in decoding] if k_max > 0 else [[] for _ in decoding]
        choice = choose_length(alphas, time_of, k_max, guard, cfg.trim, allowed)
        if lim.depth_tiers:  # one batch-wide depth: no per-request trimming below it
            lengths = [choice.k] * n
            exp = [sum(cumulative(a, choice.k)) for a in alphas]
        else:
            lengths, exp = list(choice.lengths), list(choice.expected_accepted)
        decode = [
            protos.DecodeEntry(r.rid, 1.0 + e, k + 1, k, 1) for r, k, e in zip(decoding, lengths, exp)
        ]
        budget = prefill + sum(k + 1 for k in lengths)
        return protos.Plan(
            step=ctx.step,
            valid_until_s=0.0,
            token_budget=covering_budget(max(budget, 1), decode, packing.chunks, lim.max_batch_tokens),
            prefill=packing.chunks,
            decode=decode,
            decisions=packing.decisions,
            spec_depth=choice.k if lim.depth_tiers else -1,
        )


def make(**overrides) -> SpecServePolicy:
    return SpecServePolicy(build_config(SpecServeConfig, overrides, "specserve"))


__all__ = ["SpecServeConfig", "SpecServePolicy", "make"]
