"""`slo_unified` (ours): joint deadline planning of admission, prefill and per-request trees.

Every plan, for the iteration that starts when the running one ends (plans are pipelined):

1. Deadlines. For each SLO decoder i: slack_i = deadline of its next token (stage-aware,
   SLOs-Serve schedule) - iteration start; tpot_i of its current stage; E_i[d] = expected
   committed tokens of a depth-d draft from its own acceptance estimate (AdaSpec's E_i).
2. Iteration length. An iteration of T seconds needs A_i(T) = 1 + (T - slack_i)/tpot_i + margin
   tokens from request i (AdaServe's A(r) on the deadline schedule; reasoning think/answer and
   tool stages come in through the stage TPOTs). Its tree costs nodes_i(T) verify tokens (the
   fewest with E_i >= A_i). T is bounded by the tightest decoder (A_i <= safety * E_i[D_max]);
   among a few T in [T_min, T_max] pick the one leaving the most spare tokens per second,
   (B(T) - sum nodes_i(T)) / T: the load-adaptive budget B(T) = cost.max_tokens_within(T).
3. Speculation only where it pays: trees are sized to A_i (slack-rich requests verify just
   their root); leftover tokens below the cost model's knee are free and go to a global
   path-probability fill (deeper/wider drafts), above it they go to prefill.
4. Admission + prefill against TTFT deadlines: EDF with Moore-Hodgson dropping at the spare
   rate (edf_admission.py), the decode load of each admitted request charged to the rate;
   KV checked. Requests that can no longer meet their TTFT run best effort (leftover budget
   and KV only, preempted first under KV pressure).
5. Online calibration comes from the planner's cost model (refit) and acceptance model
   (per-request estimates) that this policy reads every plan.
O(n log n) per plan; numpy for the per-request tree arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from protos import messages as protos
from sidecar.policies.base import PlanContext, Policy, build_config
from sidecar.policies.edf_admission import Job, admit_edf
from sidecar.policies.engine_shapes import covering_budget, knee_budget, snap_depth, snap_width
from sidecar.policies.prefill_packing import kv_need, pack

Decision = protos.Decision
_ADMIT, _BE = Decision.ADMIT, Decision.BEST_EFFORT


@dataclass(frozen=True)
class UnifiedConfig:
    max_depth: int = 8
    """Deepest draft used (clipped to the engine)."""
    max_width: int = 2
    """Widest tree level used for the free fill (clipped to the engine)."""
    margin: float = 0.3
    """Extra expected tokens asked of each request per iteration (acceptance noise)."""
    safety: float = 0.8
    """A request may rely on this share of its deepest tree's expected tokens when T is chosen."""
    knee_factor: float = 2.0
    """Tokens up to the knee (iteration <= knee_factor x a 1-token one) count as free."""
    max_iter_s: float = 0.2
    """Longest iteration ever planned, seconds."""
    t_candidates: int = 5
    """Iteration lengths tried between the shortest and the longest feasible one."""
    decode_efficiency: float = 1.5
    """Committed tokens per verify token assumed when charging an admission's decode load."""
    admit_slack_s: float = 0.0
    """Lateness tolerated by the TTFT feasibility check, seconds."""
    best_effort: bool = True
    """Requests that cannot meet their TTFT run best effort instead of being rejected."""
    new_token_ratio: float = 0.4
    """Share of remaining output reserved in KV on admission."""

    def __post_init__(self):
        if self.max_depth < 0 or self.max_width < 1 or not 0 < self.safety <= 1 or self.t_candidates < 1:
            raise ValueError(f"slo_unified: bad config {self}")
        if self.max_iter_s <= 0 or self.decode_efficiency <= 0 or self.knee_factor <= 1:
            raise ValueError(f"slo_unified: bad config {self}")


class UnifiedPolicy(Policy):
    name = "slo_unified"

    def __init__(self, config: UnifiedConfig | None = None):
        self.config = config or UnifiedConfig()
        self._t_running = 0.0  # predicted length of the iteration the engine runs now, seconds

    def reset(self) -> None:
        self._t_running = 0.0

    def plan(self, ctx: PlanContext) -> protos.Plan:
        cfg, st, cost, acc = self.config, ctx.state, ctx.cost, ctx.acceptance
        lim = st.limits
        now = ctx.now_s

        # ---- classify (one pass) ----------------------------------------------------------
        slo_dec, be_dec, slo_pre, be_pre, waiting = [], [], [], [], []
        context = 0
        for r in st.requests.values():
            dec = r.decision
            if dec == _ADMIT or dec == _BE:
                context += r.prefilled + r.decoded
                if r.prefilled >= r.prompt_tokens:
                    (slo_dec if dec == _ADMIT else be_dec).append(r)
                else:
                    (slo_pre if dec == _ADMIT else be_pre).append(r)
            elif dec != Decision.REJECT:
                waiting.append(r)
        n_slo, n_all = len(slo_dec), len(slo_dec) + len(be_dec)
        dm = snap_depth(cfg.max_depth, lim, st.spec_enabled)
        t1 = cost.iteration_time(0, max(1, n_all), 0, context)
        start = now + (self._t_running or t1)  # the planned iteration starts after the running one

        # ---- per-request deadlines and expected tokens [n_slo] / [n_slo, dm+1] -------------
        slack = np.empty(n_slo)
        tpot = np.empty(n_slo)
        for i, r in enumerate(slo_dec):
            slo = r.slo
            if slo.stages:
                slack[i] = r.token_deadline(r.decoded + 1) - start
                tpot[i] = r.tpot_now
            else:
                t0 = r.arrival_s + slo.ttft_s
                if r.first_token_s > t0:
                    t0 = r.first_token_s
                slack[i] = t0 + r.decoded * slo.tpot_s - start
                tpot[i] = slo.tpot_s
        exp = _expected_table([acc.alphas(r.rid, dm) for r in slo_dec], dm)  # [n_slo, dm+1]

        # ---- iteration length T and the trees it needs -----------------------------------
        t_floor = cost.iteration_time(0, n_all, 0, context)
        t_max = cfg.max_iter_s
        if n_slo:
            t_ok = slack + (cfg.safety * exp[:, dm] - 1.0) * tpot  # longest T each request tolerates
            feasible = t_ok[t_ok >= t_floor]
            if feasible.size:
                t_max = min(t_max, float(feasible.min()))
        t_max = max(t_max, t_floor)

        def need(t: float) -> tuple[np.ndarray, np.ndarray]:
            a = 1.0 + (t - slack) / tpot + cfg.margin
            np.clip(a, 1.0, exp[:, dm], out=a)
            nodes = (exp < (a[:, None] - 1e-9)).sum(axis=1) + 1  # fewest chain nodes reaching A_i
            return a, nodes

        best = None
        cands = [t_max] if cfg.t_candidates == 1 or t_max <= t_floor * 1.01 else list(
            np.geomspace(max(t_floor, 1e-4), t_max, cfg.t_candidates)
        )
        pending = sum(r.prompt_tokens - r.prefilled for r in slo_pre) + sum(
            r.prompt_tokens - r.prefilled for r in waiting
        )
        for t in cands:
            a, nodes = need(t) if n_slo else (np.empty(0), np.empty(0, dtype=np.int64))
            d_need = int(nodes.max()) - 1 if n_slo else 0
            decode_tokens = int(nodes.sum()) + len(be_dec)
            b = min(lim.max_batch_tokens, cost.max_tokens_within(t, d_need, context, decode_tokens - n_all))
            spare = b - decode_tokens
            if spare < 0 and best is not None:
                continue
            # Spare tokens per second, counting prefill only as far as there is some to do.
            useful = min(spare, pending) if pending else spare
            score = (useful / t, -t) if pending else (0.0, -t)
            if best is None or score > best[0]:
                best = (score, t, a, nodes, b, decode_tokens, d_need)
        assert best is not None
        _, t_plan, a, nodes, b_max, decode_tokens, d_need = best

        # ---- admission against TTFT deadlines (EDF + Moore-Hodgson) -----------------------
        decisions: list[protos.AdmissionDecision] = []
        kv_left = st.kv_available(cfg.new_token_ratio)
        capacity = b_max / t_plan  # tokens / second
        base_load = decode_tokens / t_plan
        g = cfg.decode_efficiency
        admitted_now, late = [], []
        if waiting:
            jobs = [Job(r.ttft_deadline_s, r.prompt_tokens - r.prefilled, 0.0, True) for r in slo_pre]
            fresh = []
            for r in waiting:
                if r.ttft_deadline_s <= start + t_plan or r.slo.best_effort:
                    late.append(r)
                else:
                    fresh.append(r)
                    load = 1.0 / (r.tpot_now * g)
                    jobs.append(Job(r.ttft_deadline_s, r.prompt_tokens - r.prefilled, max(load, 1.0 / t_plan)))
            ok = admit_edf(jobs, start, capacity, base_load, cfg.admit_slack_s)
            for r, yes in zip(fresh, ok[len(slo_pre):]):
                if yes:
                    need_kv = kv_need(r, cfg.new_token_ratio)
                    if need_kv <= kv_left:
                        kv_left -= need_kv
                        admitted_now.append(r)
                        decisions.append(protos.AdmissionDecision(r.rid, _ADMIT))

        # ---- prefill: SLO requests by EDF in the spare tokens ------------------------------
        spare = b_max - decode_tokens
        edf = sorted(slo_pre + admitted_now, key=lambda r: r.ttft_deadline_s)
        packing = pack(edf, max(0, spare), kv_left, cfg.new_token_ratio, preadmitted={r.rid for r in admitted_now})
        used = packing.used + decode_tokens

        # ---- best-effort tier: preempt under KV pressure, else leftovers ------------------
        if kv_left < 0 and (be_dec or be_pre):
            for r in sorted(be_dec + be_pre, key=lambda r: -r.seq):
                if kv_left >= 0:
                    break
                decisions.append(protos.AdmissionDecision(r.rid, Decision.PREEMPT))
                kv_left += r.kv_tokens + kv_need(r, cfg.new_token_ratio)
                if r in be_dec:
                    be_dec.remove(r)
                    used -= 1
        if cfg.best_effort:
            late_queue = be_pre + sorted(late, key=lambda r: r.seq)
            packing.kv_left = kv_left
            pack(late_queue, packing.used + max(0, b_max - used), kv_left, cfg.new_token_ratio, _BE, out=packing)
        else:
            decisions.extend(
                protos.AdmissionDecision(r.rid, Decision.REJECT) for r in late if not r.slo.best_effort
            )
        used = packing.used + decode_tokens

        # ---- free speculation below the knee, tree entries -------------------------------
        knee = knee_budget(cost, lim, cfg.knee_factor)
        fill = max(0, min(knee, b_max) - used)
        per_req = fill / n_all if n_all else 0.0
        d_fill = snap_depth(min(dm, int(per_req)), lim, st.spec_enabled) if per_req >= 1 else 0
        w = snap_width(min(cfg.max_width, max(1, int(per_req // max(1, dm)))), lim) if d_fill else 1
        decode: list[protos.DecodeEntry] = []
        extra = int(per_req)  # fill share per request (tree caps are reserved by the engine)
        for i, r in enumerate(slo_dec):
            m = int(nodes[i])
            depth = snap_depth(max(m - 1, d_fill), lim, st.spec_enabled)
            cap = min(m + extra, 1 + depth * w) if depth else 1
            decode.append(protos.DecodeEntry(r.rid, float(a[i]), max(1, cap), depth, w if depth else 1))
        for r in be_dec:
            cap = min(1 + extra, 1 + d_fill * w) if d_fill else 1
            decode.append(protos.DecodeEntry(r.rid, 1.0, cap, d_fill, w if d_fill else 1))
        budget = covering_budget(max(used + fill, packing.used + len(decode)), decode, packing.chunks)

        steps = max(d_need, d_fill)
        self._t_running = cost.iteration_time(packing.used, budget - packing.used, steps, context, n_all * steps)
        decisions.extend(packing.decisions)
        return protos.Plan(
            step=ctx.step,
            valid_until_s=0.0,
            token_budget=budget,
            prefill=packing.chunks,
            decode=decode,
            decisions=decisions,
            spec_depth=steps if lim.depth_tiers else -1,
        )


def _expected_table(alphas: list[list[float]], dm: int) -> np.ndarray:
    """[n, dm+1]: expected committed tokens (root included) of a depth-d chain, d = 0..dm."""
    n = len(alphas)
    out = np.ones((n, dm + 1))
    if n and dm:
        al = np.array(alphas, dtype=np.float64).reshape(n, dm)
        np.cumsum(np.cumprod(al, axis=1), axis=1, out=out[:, 1:])
        out[:, 1:] += 1.0
    return out


def make(**overrides) -> UnifiedPolicy:
    return UnifiedPolicy(build_config(UnifiedConfig, overrides, "slo_unified"))


__all__ = ["UnifiedConfig", "UnifiedPolicy", "make"]
