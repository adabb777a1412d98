"""`slos_serve`: SLOs-Serve (arXiv 2504.08784), papers.md section 3.

- TPOT tiers: running requests grouped by the TPOT of their current stage.
- SD planner (tier_planner.py): one chain length per tier from a global alpha, the batch
  period T and the per-batch prefill budget that keeps every tier on pace.
- Prefill: EDF by TTFT deadline into the per-batch prefill budget (chunked).
- Admission (dp_admission.py): when new requests wait, a DP over EDF-sorted candidates
  (running ones forced) with Pareto pruning picks the most requests that keep every TTFT
  deadline and the decode load sustainable within free KV. Declined requests go to the
  best-effort tier: they run only on leftover budget and KV and are preempted first.
"""

from __future__ import annotations

from dataclasses import dataclass

from protos import messages as protos
from sidecar.policies.base import PlanContext, Policy, build_config
from sidecar.policies.dp_admission import Candidate, admit_dp
from sidecar.policies.engine_shapes import covering_budget, snap_depth
from sidecar.policies.prefill_packing import kv_need, pack
from sidecar.policies.tier_planner import TierPlanner, acc
from sidecar.state import ReqState

Decision = protos.Decision


@dataclass(frozen=True)
class SlosServeConfig:
    max_len: int = 8
    """S: most verify tokens per request per batch (root + drafts)."""
    tier_round_s: float = 0.001
    """TPOTs are rounded to this grid to form tiers, seconds."""
    dp_window: int = 8
    """Most new requests the DP considers per plan (EDF order); the rest wait."""
    best_effort: bool = True
    """Declined requests run best effort instead of waiting forever."""
    new_token_ratio: float = 0.4
    """Share of remaining output reserved in KV on admission."""
    alpha_sample: int = 64
    """Requests sampled to estimate the global alpha."""
    default_alpha: float = 0.7
    """Global alpha when nothing runs yet."""

    def __post_init__(self):
        if self.max_len < 1 or self.tier_round_s <= 0 or self.dp_window < 0:
            raise ValueError(f"slos_serve: bad config {self}")


class SlosServePolicy(Policy):
    name = "slos_serve"

    def __init__(self, config: SlosServeConfig | None = None):
        self.config = config or SlosServeConfig()
        self._declined: set[str] = set()  # rids the DP declined: best-effort candidates

    def reset(self) -> None:
        self._declined.clear()

    def observe(self, msg: protos.Message) -> None:
        if isinstance(msg, protos.RequestFinished):
            self._declined.discard(msg.rid)

    def _tier_of(self, r: ReqState) -> float:
        q = self.config.tier_round_s
        return max(q, round(r.tpot_now / q) * q)

    def _alpha(self, ctx: PlanContext, reqs: list[ReqState], depth: int) -> float:
        sample = reqs[: self.config.alpha_sample]
        if not sample or depth <= 0:
            return self.config.default_alpha
        vals = [a for r in sample for a in ctx.acceptance.alphas(r.rid, depth)]
        return min(0.99, max(0.0, sum(vals) / len(vals)))

    def plan(self, ctx: PlanContext) -> protos.Plan:
        cfg, state, now = self.config, ctx.state, ctx.now_s
        lim = state.limits
        running = state.running()
        slo_run = [r for r in running if r.decision == Decision.ADMIT]
        be_run = [r for r in running if r.decision == Decision.BEST_EFFORT]
        decoding = [r for r in slo_run if r.prefilled >= r.prompt_tokens]
        waiting = state.waiting()
        max_len = snap_depth(cfg.max_len - 1, lim, state.spec_enabled) + 1
        alpha = self._alpha(ctx, decoding, max_len - 1)
        context = sum(r.prefilled + r.decoded for r in running)
        cost = ctx.cost

        def ttb(period: float, steps: int) -> int:
            return cost.max_tokens_within(period, steps, context, steps * len(decoding))

        new = sorted((r for r in waiting if r.rid not in self._declined), key=lambda r: r.ttft_deadline_s)
        new = new[: cfg.dp_window]
        taus = sorted({self._tier_of(r) for r in (*slo_run, *new)})
        index = {t: i for i, t in enumerate(taus)}
        planner = TierPlanner(taus, alpha, max_len)

        decisions: list[protos.AdmissionDecision] = []
        admitted_now: list[ReqState] = []
        kv_left = state.kv_available(cfg.new_token_ratio)
        if new:
            cands = [Candidate(now, 0, 0, index[self._tier_of(r)], forced=True) for r in decoding]
            cands += [
                Candidate(r.ttft_deadline_s, r.remaining_prefill, 0, index[self._tier_of(r)], forced=True)
                for r in slo_run
                if r.prefilled < r.prompt_tokens
            ]
            first_new = len(cands)
            cands += [
                Candidate(r.ttft_deadline_s, r.remaining_prefill, kv_need(r, cfg.new_token_ratio), index[self._tier_of(r)])
                for r in new
            ]

            def rate_of(counts):
                return planner.best(counts, ttb).prefill_rate

            result = admit_dp(cands, now, max(0, kv_left), rate_of, len(taus))
            for r, ok in zip(new, result.admitted[first_new:]):
                if ok:
                    admitted_now.append(r)
                    kv_left -= kv_need(r, cfg.new_token_ratio)
                    decisions.append(protos.AdmissionDecision(r.rid, Decision.ADMIT))
                else:
                    self._declined.add(r.rid)

        # Per-tier speculation for this batch (the SLO decoders).
        counts = [0] * len(taus)
        for r in decoding:
            counts[index[self._tier_of(r)]] += 1
        pending_prefill = any(r.prefilled < r.prompt_tokens for r in slo_run) or bool(admitted_now)
        tp = planner.best(counts, ttb, prefer_prefill=pending_prefill)
        decode: list[protos.DecodeEntry] = []
        for r in decoding:
            sl = snap_depth(tp.lengths[index[self._tier_of(r)]] - 1, lim, state.spec_enabled) + 1
            decode.append(protos.DecodeEntry(r.rid, acc(sl, alpha), sl, sl - 1, 1))
        slo_prefill_budget = max(0, min(tp.prefill_per_batch, lim.max_batch_tokens - tp.decode_tokens))

        # EDF prefill of SLO requests, then best effort on what is left.
        edf = sorted(
            [r for r in slo_run if r.prefilled < r.prompt_tokens] + admitted_now, key=lambda r: r.ttft_deadline_s
        )
        packing = pack(edf, slo_prefill_budget, kv_left, cfg.new_token_ratio, preadmitted={r.rid for r in admitted_now})
        leftover = slo_prefill_budget - packing.used

        # Best-effort tier: preempt under KV pressure, else roots + leftover prefill.
        be_decoding = [r for r in be_run if r.prefilled >= r.prompt_tokens]
        if kv_left < 0 and be_run:
            for r in sorted(be_run, key=lambda r: -r.seq):
                if kv_left >= 0:
                    break
                decisions.append(protos.AdmissionDecision(r.rid, Decision.PREEMPT))
                kv_left += r.kv_tokens + kv_need(r, cfg.new_token_ratio)
                if r in be_decoding:
                    be_decoding.remove(r)
                be_run = [x for x in be_run if x is not r]
        for r in be_decoding:
            decode.append(protos.DecodeEntry(r.rid, 1.0, 1, 0, 1))
        leftover -= len(be_decoding)
        if cfg.best_effort and leftover > 0:
            be_queue = [r for r in be_run if r.prefilled < r.prompt_tokens]
            be_queue += [r for r in waiting if r.rid in self._declined]
            packing.kv_left = kv_left
            pack(be_queue, packing.used + leftover, kv_left, cfg.new_token_ratio, Decision.BEST_EFFORT, out=packing)
        decisions.extend(packing.decisions)

        budget = max(tp.decode_tokens + slo_prefill_budget, packing.used + len(decode))
        return protos.Plan(
            step=ctx.step,
            valid_until_s=0.0,
            token_budget=covering_budget(budget, decode, packing.chunks, lim.max_batch_tokens),
            prefill=packing.chunks,
            decode=decode,
            decisions=decisions,
            spec_depth=max((e.depth for e in decode), default=0) if lim.depth_tiers else -1,
        )


def make(**overrides) -> SlosServePolicy:
    return SlosServePolicy(build_config(SlosServeConfig, overrides, "slos_serve"))


__all__ = ["SlosServeConfig", "SlosServePolicy", "make"]
