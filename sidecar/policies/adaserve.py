"""`adaserve`: AdaServe (EuroSys '26), SLO-customized speculative decoding (papers.md section 1).

Per iteration, with n running requests and budget B (knee of the profiled tokens -> latency
curve unless configured):

    d      = clip(D_min, D_max, floor(B1 / (n + c1)) - 1)          adaptive depth
    w      = clip(1, W_max, floor(B2 / n) + c2)                    adaptive width
    A(r)   = (l_r + t_spec) / t_tpot - o_r                          l_r: since first token
    A_cap  = min(A(r), d + 1);  min_tokens = max(1, A_cap)          (the root counts 1.0)
    n_max  = int(B * 1.2 / n)                                      per-request tree cap

The engine then selects each request's top nodes by path probability up to A_cap / n_max and
fills the rest of B globally. Prefill: FCFS chunked (chunk 1024) on what the SLO trees leave;
no admission control beyond KV; TTFT is not an objective (as in the paper).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from protos import messages as protos
from sidecar.policies.base import PlanContext, Policy, build_config
from sidecar.policies.engine_shapes import covering_budget, knee_budget, snap_depth, snap_width
from sidecar.policies.prefill_packing import pack
from sidecar.policies.spec_efficiency import cumulative


@dataclass(frozen=True)
class AdaServeConfig:
    budget_tokens: int = 0
    """B, verify + prefill tokens per iteration (0 = knee of the cost model)."""
    knee_factor: float = 2.0
    """Knee = batch size whose iteration takes this many times a 1-token iteration."""
    chunk_size: int = 1024
    """Most prompt tokens per iteration (AdaServe CHUNK_SIZE)."""
    min_depth: int = 4
    """D_min (artifact MIN_TREE_DEPTH)."""
    max_depth: int = 8
    """D_max (artifact MAX_TREE_DEPTH)."""
    max_width: int = 3
    """W_max (artifact MAX_TREE_WIDTH)."""
    b1: int = 0
    """Verifier budget of the depth rule (0 = B)."""
    c1: int = 0
    """Offset of the depth rule."""
    b2: int = 512
    """Speculator budget of the width rule (artifact spec batch size)."""
    c2: int = 0
    """Offset of the width rule."""
    cap_factor: float = 1.2
    """n_max = int(B * cap_factor / n) (code: max_token_toward_slo)."""
    new_token_ratio: float = 0.4
    """Share of remaining output reserved in KV on admission."""

    def __post_init__(self):
        if self.min_depth < 0 or self.max_depth < self.min_depth or self.max_width < 1:
            raise ValueError(f"adaserve: need 0 <= min_depth <= max_depth, max_width >= 1: {self}")
        if self.budget_tokens < 0 or self.chunk_size < 1 or self.cap_factor <= 0 or self.knee_factor <= 1:
            raise ValueError(f"adaserve: bad budget/chunk/cap/knee settings: {self}")


def min_tokens_needed(since_first_token_s: float, t_spec_s: float, tpot_s: float, decoded: int) -> float:
    """A(r) = (l + t_spec) / t_tpot - o: tokens to accept this iteration to stay on SLO."""
    return (since_first_token_s + t_spec_s) / tpot_s - decoded


def adaptive_depth(n: int, b1: int, c1: int, d_min: int, d_max: int) -> int:
    """d = clip(D_min, D_max, floor(B1 / (n + c1)) - 1)."""
    raw = math.floor(b1 / max(1, n + c1)) - 1
    return max(d_min, min(d_max, raw))


def adaptive_width(n: int, b2: int, c2: int, w_max: int) -> int:
    """w = clip(1, W_max, floor(B2 / n) + c2)."""
    raw = math.floor(b2 / max(1, n)) + c2
    return max(1, min(w_max, raw))


def nodes_for(target: float, cum: list[float], cap: int) -> int:
    """Chain nodes (root included) whose expected committed tokens reach `target` (<= cap)."""
    total, m = 1.0, 1
    for p in cum:
        if total >= target or m >= cap:
            break
        total += p
        m += 1
    return m


class AdaServePolicy(Policy):
    name = "adaserve"

    def __init__(self, config: AdaServeConfig | None = None):
        self.config = config or AdaServeConfig()

    def plan(self, ctx: PlanContext) -> protos.Plan:
        cfg, state, now = self.config, ctx.state, ctx.now_s
        lim = state.limits
        running = state.running()
        decoding = [r for r in running if r.prefilled >= r.prompt_tokens]
        n = len(decoding)
        budget = cfg.budget_tokens or knee_budget(ctx.cost, lim, cfg.knee_factor)
        budget = max(min(budget, lim.max_batch_tokens), n)
        spec = state.spec_enabled and n > 0
        d = snap_depth(adaptive_depth(n, cfg.b1 or budget, cfg.c1, cfg.min_depth, cfg.max_depth), lim, spec)
        w = snap_width(adaptive_width(n, cfg.b2, cfg.c2, cfg.max_width), lim) if d > 0 else 1
        tree_max = 1 + d * w
        n_max = max(1, min(tree_max, int(budget * cfg.cap_factor / max(1, n))))
        context = sum(r.prefilled + r.decoded for r in decoding)
        t_spec = ctx.cost.iteration_time(0, budget, d, context, n * w * d)

        decode: list[protos.DecodeEntry] = []
        reserve = 0  # verify tokens the SLO step is expected to use
        for r in decoding:
            since = now - r.first_token_s if r.first_token_s > 0 else 0.0
            a = min_tokens_needed(since, t_spec, r.tpot_now, r.decoded)
            a_cap = min(a, d + 1)
            target = a_cap if a_cap > 1.0 else 1.0
            decode.append(protos.DecodeEntry(r.rid, target, n_max, d, w))
            if d > 0 and target > 1.0:
                reserve += nodes_for(target, cumulative(ctx.acceptance.alphas(r.rid, d), d), n_max)
            else:
                reserve += 1

        prefill_budget = max(0, budget - max(reserve, n))
        packing = pack(
            running + state.waiting(),
            prefill_budget,
            state.kv_available(cfg.new_token_ratio),
            cfg.new_token_ratio,
            chunk_cap=cfg.chunk_size,
            kv_capacity=lim.kv_capacity_tokens,
        )
        return protos.Plan(
            step=ctx.step,
            valid_until_s=0.0,
            token_budget=covering_budget(budget, decode, packing.chunks, lim.max_batch_tokens),
            prefill=packing.chunks,
            decode=decode,
            decisions=packing.decisions,
            spec_depth=d if lim.depth_tiers else -1,
        )


def make(**overrides) -> AdaServePolicy:
    return AdaServePolicy(build_config(AdaServeConfig, overrides, "adaserve"))


__all__ = ["AdaServeConfig", "AdaServePolicy", "make", "min_tokens_needed", "adaptive_depth", "adaptive_width"]
