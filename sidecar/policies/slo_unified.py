"""`slo_unified` (ours): joint deadline planning of admission, prefill and per-request trees.

Every plan, for the iteration that starts when the running one ends (plans are pipelined):

1. Deadlines. For each SLO decoder i: slack_i = deadline of its next token (stage-aware,
   SLOs-Serve schedule) - iteration start; tpot_i of its current stage; E_i[m] = expected
   committed tokens of an m-node draft from its own acceptance estimate (AdaSpec's E_i).
2. Trees sized by efficiency, floored by deadlines. Every iteration each batched request
   costs a fixed F_i (its KV reads + its share of the weights pass and draft steps) plus c
   per verify token, so its cheapest tokens come from m_i = argmax_m E_i[m] / (F_i + c m)
   nodes (SpecServe's goodput G per request: speculation shrinks or switches off where it
   does not pay). A request behind its deadlines gets at least the nodes reaching
   A_i = 1 + (T - slack_i) / tpot_i + margin (AdaServe's A(r) on the deadline schedule;
   reasoning think/answer and tool stages come in through the stage TPOTs).
3. Shared draft depth. The deepest tree sets the batch's draft steps, so one level deeper
   lengthens the iteration, and so delays the next token, of every request. Each level is
   priced at its own iteration length: the level keeping the most SLO decoders on their
   deadlines (A_i at that length) wins, then the one whose iteration fits T_lim, then the most
   expected committed tokens per second. A deadline floor that no level meets does not force
   a deeper tree (it would only make every iteration longer).
4. Load-adaptive budget. T_lim = the longest iteration that keeps every SLO decoder on its
   SLOs-Serve deadlines (safety * E_i[m_i] tokens; a first token before the TTFT deadline
   banks that much slack), capped by ttft_frac; tree floors and the level choice pace from
   the first token instead (anchor_first_token). The rest of B(T_lim) =
   cost.max_tokens_within(T_lim) goes to prefill; levels cut for urgent prefill give back
   their draft steps to the budget.
5. Admission + prefill against TTFT deadlines: EDF with Moore-Hodgson dropping at the spare
   rate (edf_admission.py), each admitted request's decode load charged to that rate; KV
   checked. Requests that can no longer meet their TTFT run best effort (leftover budget and
   KV only, preempted first under KV pressure). The EDF head's prompt is prefilled whole when
   the decoders' deadlines allow (k chunks would wait k iterations of >= the fixed cost each,
   and an early first token banks slack for its decode); decoders already past saving do not
   hold T_lim at the floor.
   Decode gate (decode_gate.py): a TTFT-feasible request is admitted only if the decode
   batch with it (and with the requests being prefilled), its iteration stretched by the
   prefill duty of the prompts arriving, stays within the tightest E_i * tpot_i: past that
   point one more request makes every decoder late; it waits instead (best effort once its
   TTFT is lost).
   Overload shedding (overload_shed.py): under sustained overload, arrivals are rejected on
   sight costliest first (GPU seconds per request) until the rest fits the engine.
6. Online calibration: the planner's cost model (refit) and acceptance model (per request)
   feed every plan.
7. Engines that cannot mix prefill and decode in one forward (EngineHello.mixed_forward False:
   SGLang without --enable-mixed-chunk): a prefill forward stalls every decoder, so prompts go
   whole and together, now unless waiting saves a decoder (prefill_only.py). Every plan lets
   requests that arrive after it prefill at once while the decoders absorb it (arrival_tokens:
   the prefill room it leaves unused, or a prefill-only forward within the decoders' slack).
O(n log n) per plan; numpy for the per-request tree arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter

import numpy as np

from protos import messages as protos
from sidecar.acceptance import chain_expected
from sidecar.policies.base import PlanContext, Policy, build_config
from sidecar.policies import prefill_only
from sidecar.policies.decode_gate import ArrivalRate, GateCandidate, GateLoad, admit_decodes
from sidecar.policies.edf_admission import Job, admit_edf
from sidecar.policies.expected_rows import ExpectedRows
from sidecar.policies.engine_shapes import covering_budget, snap_depth, snap_width
from sidecar.policies.overload_shed import OverloadShed, ShedConfig
from sidecar.policies.prefill_packing import kv_need, pack

Decision = protos.Decision
_ADMIT, _BE, _REJECT = Decision.ADMIT, Decision.BEST_EFFORT, Decision.REJECT
_seq_of = attrgetter("seq")


@dataclass(frozen=True)
class UnifiedConfig:
    max_depth: int = 8
    """Deepest draft used (clipped to the engine)."""
    width: int = 2
    """Tree width of every draft (clipped to the engine); the engine picks the best nodes."""
    margin: float = 0.3
    """Extra expected tokens asked of a request behind its deadlines (acceptance noise)."""
    safety: float = 0.8
    """A request may rely on this share of its tree's expected tokens when T_lim is set."""
    max_iter_s: float = 0.15
    """Longest iteration ever planned, seconds."""
    efficiency: bool = True
    """Size trees by per-request goodput (off: deadline minimum only)."""
    residency_weight: float = 1.0
    """Scale of a request's fixed per-iteration cost when sizing its tree (> 1: value finishing
    sooner, e.g. when KV capacity binds; its KV and batch slot are freed earlier)."""
    decode_efficiency: float = 2.0
    """Committed tokens per verify token assumed when charging an admission's decode load."""
    admit_slack_s: float = 0.0
    """Lateness tolerated by the TTFT feasibility check, seconds."""
    ttft_lead_iters: float = 1.0
    """Prefill must end this many iterations before the TTFT deadline: the first decode step
    after the first token runs on a plan made before the request was decoding, and a tight
    TPOT leaves no room for a late start."""
    best_effort: bool = True
    """Requests that cannot meet their TTFT run best effort (else they are rejected)."""
    reject_late: bool = False
    """Reject late requests outright unless they belong to an agent session (rejecting a call
    cancels the session's later calls, which may still meet their own SLOs): a hopeless
    request's KV and its share of every iteration's KV reads go to requests that can make it."""
    new_token_ratio: float = 0.2
    """Share of remaining output reserved in KV on admission."""
    ttft_frac: float = 0.15
    """Iterations stay below this share of the tightest TTFT seen in the last `ttft_memory_s`:
    a new request waits ~2 iterations (running + planned) before its prefill even starts."""
    ttft_memory_s: float = 5.0
    """How long a tight TTFT keeps iterations short after the last such request, seconds."""
    keep_sessions: bool = True
    """With reject_late: late agent-session calls run best effort instead of being rejected."""
    admit_resident: bool = True
    """Admit a request whose cached prefix is resident when its new tokens fit the free KV,
    even if the output reservations of running requests would block it."""
    kv_footprint_order: bool = True
    """When free KV cannot hold every feasible admission, admit by ascending KV x time
    footprint ((new prompt + max_new/2) * max_new) instead of EDF: maximizes requests served."""
    anchor_first_token: bool = True
    """Pace tokens from the actual first token (t0 = first-token time) rather than from
    max(TTFT deadline, first token): stricter than the deadline schedule when the first token
    is early, so the mean TPOT (AdaServe's attainment) holds too, not only every deadline."""
    alpha_refresh: int = 16
    """Plans between re-reads of a request's acceptance estimate (incremental state)."""
    decode_gate: bool = True
    """Admit a request only if the decode batch, with it and with the prefill duty of the
    prompts arriving, still keeps pace with the tightest decoder (decode_gate.py)."""
    gate_safety: float = 0.9
    """Share of the tightest E_i * tpot_i the gate lets an iteration take."""
    gate_quantile: float = 0.0
    """Pace the gate keeps: this quantile of the SLO decoders' E_i * tpot_i (0 = the tightest;
    0.1 lets the hardest tenth fall behind rather than hold every admission back)."""
    gate_duty: bool = False
    """Stretch projected iterations by the prefill duty of arriving prompts (off: measured on
    the mixed H100 workload, the duty estimate made the gate decline far too much)."""
    gate_shortest_first: bool = False
    """When the gate binds, offer it the newcomers with the fewest max_new_tokens first (a short
    request holds its place in the batch briefly); off: EDF order, which measured slightly
    better on the mixed H100 workload (0.861 vs 0.853 attainment at 27 req/s, seeds 0-1)."""
    gate_sessions: bool = True
    """Gate agent-session calls too (off: a later call of an admitted session skips the gate,
    since declining it loses the session's investment and, while it waits, its cached context;
    measured on the mixed H100 workload at 27 req/s, seeds 0-1: 0.842 attainment off vs 0.861 on)."""
    gate_output_tokens: int = 1024
    """Output tokens assumed at most when projecting a candidate's KV reads (half are counted)."""
    arrival_window_s: float = 5.0
    """Time constant of the prompt-token arrival rate behind the prefill duty, seconds."""
    prefill_keep_share: float = 0.5
    """Engines that cannot mix prefill and decode (prefill_only.py): a prompt waits for the
    running decoders' sake at most until only this share of its TTFT budget is left (an early
    first token banks that much slack for its own decode)."""

    overload_shed: bool = True
    """Under sustained overload, reject the costliest arrivals (ascending GPU cost per request
    fills the capacity; overload_shed.py). Below overload every arrival goes on as before."""
    shed_capacity: float = 1.0
    """GPU seconds per second the shed threshold lets arriving work fill (ideal-batching units;
    mixed H100 at 36 req/s, 60 s: 1.0 and 1.07 serve every admitted request on its SLOs, 1.15
    misses 5%; at 22.5 req/s, 300 s: 0.95 / 1.0 / 1.05 reach 0.915 / 0.909 / 0.894)."""
    shed_trigger: float = 1.5
    """Shedding starts only when the arriving load exceeds this, GPU s/s (>= shed_capacity): up
    to ~1.4 slo_unified serves >= 90% of every class in 60 s windows (the drain after a burst);
    at 1.3, gamma bursts at 18 req/s on the mixed H100 workload shed 13 requests (seed 1)."""
    shed_distress: float = 0.02
    """Shedding also starts past shed_capacity once more than this share of the SLO requests
    are behind their deadlines (EWMA over 5 s; 1.0: never). A sustained overload below the
    trigger (300 s at 22.5 req/s: 0.861 without, 0.909 with) while a burst that slo_unified
    absorbs (60 s at 18 req/s) sheds nothing."""
    shed_window_s: float = 15.0
    """Time constant of the shed's arrival-rate estimates, seconds."""
    shed_hysteresis: float = 0.1
    """The shed threshold loosens only to where (1 - this) x shed_capacity is filled."""

    def __post_init__(self):
        if (self.shed_capacity <= 0 or self.shed_trigger < self.shed_capacity or self.shed_window_s <= 0
                or not 0 <= self.shed_hysteresis < 1):
            raise ValueError(f"slo_unified: bad overload-shed config {self}")
        if self.alpha_refresh < 1:
            raise ValueError(f"slo_unified: alpha_refresh must be >= 1: {self}")
        if self.max_depth < 0 or self.width < 1 or not 0 < self.safety <= 1:
            raise ValueError(f"slo_unified: bad config {self}")
        if self.max_iter_s <= 0 or self.decode_efficiency <= 0 or self.margin < 0:
            raise ValueError(f"slo_unified: bad config {self}")
        if (not 0 < self.gate_safety <= 1 or self.gate_output_tokens < 0 or self.arrival_window_s <= 0
                or not 0 <= self.gate_quantile < 1 or not 0 <= self.prefill_keep_share <= 1):
            raise ValueError(f"slo_unified: bad decode-gate config {self}")


class UnifiedPolicy(Policy):
    name = "slo_unified"

    def __init__(self, config: UnifiedConfig | None = None):
        self.config = config or UnifiedConfig()
        self._t_running = 0.0  # predicted length of the iteration the engine runs now, seconds
        self._plans = 0
        self.counters = {"late": 0, "declined": 0, "admitted": 0, "kv_blocked": 0, "gated": 0}
        """Admission outcomes so far (late: TTFT already unreachable -> best effort)."""
        self._tight_ttft = (float("inf"), 0.0)  # (tightest TTFT SLO seen, when), seconds
        self._rows = ExpectedRows(self.config.alpha_refresh)  # per-request E rows, incremental
        self._dl: dict[str, tuple] = {}  # rid -> (slo, stage, t1, decoded, linear_to, deadline, tpot)
        self._pace: dict = {}  # ReqState -> `_pace_anchor`
        self._arrivals = ArrivalRate(self.config.arrival_window_s)  # new prompt tokens / second
        self._sessions: set[str] = set()  # agent sessions with an admitted call (gate exemption)
        cfg = self.config
        self._shed = OverloadShed(ShedConfig(capacity=cfg.shed_capacity, trigger=cfg.shed_trigger,
                                             distress=cfg.shed_distress,
                                             window_s=cfg.shed_window_s, hysteresis=cfg.shed_hysteresis))
        self.counters["shed"] = 0

    def reset(self) -> None:
        self._shed.reset()
        self._t_running = 0.0
        self._tight_ttft = (float("inf"), 0.0)
        self._rows.clear()
        self._dl.clear()
        self._pace.clear()
        self._arrivals = ArrivalRate(self.config.arrival_window_s)
        self._sessions.clear()

    def observe(self, msg: protos.Message) -> None:
        if isinstance(msg, protos.RequestArrived):
            self._arrivals.add(msg.arrival_s, max(0, msg.prompt_tokens - msg.cached_prefix_tokens))
            if len(self._sessions) > 65536:  # bounded: old sessions forget their exemption
                self._sessions.clear()
            if self.config.overload_shed:
                self._shed.arrived(msg)
        elif isinstance(msg, protos.RequestFinished) and self.config.overload_shed:
            self._shed.finished(msg)

    # ---- incremental per-request inputs --------------------------------------------------

    def _pace_anchor(self, r, ft: float) -> tuple:
        """Cached per SLO decoder while its first-token time `ft` holds: (ft, base, bank, tpot),
        the next token due at base + decoded * tpot (seconds; base None: multi-stage,
        `_staged_deadline`); bank: seconds its SLOs-Serve deadlines lie past the paced ones
        (a first token before the TTFT deadline, anchor_first_token)."""
        slo = r.slo
        t0 = r.arrival_s + slo.ttft_s
        anchor_first = self.config.anchor_first_token
        early = anchor_first and 0.0 < ft < t0  # paced from a first token before t0
        bank = t0 - ft if early else 0.0
        if slo.stages:
            p = (ft, None, bank, 0.0)
        else:
            p = (ft, ft if ft > t0 or (anchor_first and ft > 0.0) else t0, bank, slo.tpot_s)
        self._pace[r] = p
        return p

    def _staged_deadline(self, r) -> tuple[float, float]:
        """(deadline of the next token, current TPOT) of a multi-stage request.

        ReqState.token_deadline, or, while the stage and first-token time are unchanged and
        every later token is priced at the current stage's TPOT (last stage, or a stage of
        unknown length, or the next token still inside its planned length), the cached deadline
        plus tpot per token decoded since (exact then)."""
        hit = self._dl.get(r.rid)
        dd = r.decoded
        if hit is not None and hit[0] is r.slo and hit[1] == r.stage and hit[2] == r.first_token_s \
                and hit[3] <= dd < hit[4]:
            return hit[5] + (dd - hit[3]) * hit[6], hit[6]
        stages = r.slo.stages
        k = r.stage
        tp = stages[k if k < len(stages) else -1].tpot_s
        # tokens decoded below `linear_to` are all priced at this stage's TPOT (the stage's start
        # is fixed while it lasts)
        if k >= len(stages) - 1 or stages[k].tokens <= 0:
            linear_to = math.inf
        else:
            linear_to = r.stage_starts[k] + stages[k].tokens if k < len(r.stage_starts) else -math.inf
        d = r.token_deadline(dd + 1)
        self._dl[r.rid] = (r.slo, k, r.first_token_s, dd, linear_to, d, tp)
        return d, tp

    def plan(self, ctx: PlanContext) -> protos.Plan:
        cfg, st, cost, acc = self.config, ctx.state, ctx.cost, ctx.acceptance
        lim = st.limits
        now = ctx.now_s

        # ---- classify (one pass) ----------------------------------------------------------
        slo_dec, be_dec, slo_pre, be_pre, waiting = [], [], [], [], []
        s_rid, s_ctx, s_left, s_dl, s_tpot = [], [], [], [], []  # SLO decoders
        s_bank = []  # seconds the SLOs-Serve deadlines lie past the paced ones (early first token)
        b_rid, b_ctx, b_left = [], [], []  # best-effort decoders
        reserved = 0  # KV admitted requests still need (the SGLang reservation of kv_available);
        # decoders' output share is added below, vectorized over their remaining output
        pending_min = math.inf  # tightest TTFT SLO of the SLO requests waiting or prefilling, seconds
        past_ttft = 0  # waiting requests past their TTFT deadline
        ratio_kv = cfg.new_token_ratio
        staged, pace, pace_get = self._staged_deadline, self._pace_anchor, self._pace.get
        for r in st.requests.values():
            dec = r.decision
            if dec is _ADMIT or dec is _BE:  # members: `is` (the planner stores Decision(...) only)
                pf, pt, dd = r.prefilled, r.prompt_tokens, r.decoded
                rest = r.max_new_tokens - dd
                reserved += pt - pf
                if pf < pt:
                    reserved += int((rest if rest < 4096 else 4096) * ratio_kv)
                    if dec is _ADMIT:
                        slo_pre.append(r)
                        slo = r.slo
                        if slo.ttft_s < pending_min and not slo.best_effort:
                            pending_min = slo.ttft_s
                    else:
                        be_pre.append(r)
                elif dec is _ADMIT:
                    slo_dec.append(r)
                    s_rid.append(r.rid)
                    s_ctx.append(pf + dd)
                    s_left.append(rest)
                    ft = r.first_token_s
                    p = pace_get(r)
                    if p is None or p[0] != ft:
                        p = pace(r, ft)
                    if p[1] is None:  # multi-stage
                        d, tp = staged(r)
                        d -= p[2]
                    else:
                        tp = p[3]
                        d = p[1] + dd * tp
                    s_dl.append(d)
                    s_bank.append(p[2])
                    s_tpot.append(tp)
                else:
                    be_dec.append(r)
                    b_rid.append(r.rid)
                    b_ctx.append(pf + dd)
                    b_left.append(rest)
            elif dec is not _REJECT:
                waiting.append(r)
                slo = r.slo
                if r.arrival_s + slo.ttft_s <= now:
                    past_ttft += 1
                if slo.ttft_s < pending_min and not slo.best_effort:
                    pending_min = slo.ttft_s
        dec_all = slo_dec + be_dec
        n_slo, n_all = len(slo_dec), len(dec_all)
        for cache, live in ((self._dl, s_rid), (self._pace, slo_dec)):
            if len(cache) > 2 * n_slo + 64:  # forget finished requests
                live = set(live)
                for key in [k for k in cache if k not in live]:
                    del cache[key]
        tight, seen = self._tight_ttft
        if pending_min <= tight or now - seen > cfg.ttft_memory_s:  # tighter, or the old one expired
            tight, seen = self._tight_ttft = (pending_min, now)
        t_cap = min(cfg.max_iter_s, cfg.ttft_frac * tight) if cfg.ttft_frac > 0 else cfg.max_iter_s
        spec_on = st.spec_enabled
        dm = snap_depth(cfg.max_depth, lim, spec_on)
        w = snap_width(cfg.width, lim) if dm else 1
        self._plans += 1

        # ---- per-request arrays: deadlines [n_slo], context [n_all], E [n_all, dm+1] --------
        all_rid = s_rid + b_rid
        tok = _floats(s_ctx, b_ctx, s_left, b_left)
        ctx_tok, left_tok = tok[:n_all], tok[n_all:]  # context tokens, output tokens left [n_all]
        context = int(ctx_tok.sum())
        t_floor = cost.iteration_time(0, n_all, 0, context)
        start = now + (self._t_running or t_floor)  # the planned iteration starts after the running one
        paced = _floats(s_dl, s_bank, s_tpot)  # deadlines, banks, TPOTs [3 * n_slo], seconds
        slack = paced[:n_slo] - start  # to the paced deadline (tree floors)
        hard = slack + paced[n_slo:2 * n_slo]  # to the SLOs-Serve deadline (T_lim)
        tpot = paced[2 * n_slo:]
        # exp[i, m-1]: expected committed tokens of an m-node chain (a wider tree does better)
        exp = self._rows.gather(acc, all_rid, dm, self._plans)
        reserved += int(np.trunc(np.minimum(left_tok, 4096.0) * ratio_kv).sum())  # == sum of int(min(rest, 4096) * r)
        m_max = np.minimum(np.maximum(left_tok, 1), dm + 1).astype(np.int64)  # no drafts past the output cap

        # ---- tree sizes: efficiency, floored by deadlines, cut until T_lim holds ----------
        steps_cost = cost.d_step_s * dm * cost.scale
        per_tok = (cost.k_tok_s + cost.k_knee_s + cost.k_dtok_s) * cost.scale  # s per verify token
        if dm and n_all and cfg.efficiency:
            fixed = cost.k_ctx_s * cost.scale * ctx_tok + (cost.base_s * cost.scale + steps_cost) / n_all  # [n_all]
            if cfg.residency_weight != 1.0:
                fixed *= cfg.residency_weight
            sizes = np.arange(1, dm + 2, dtype=np.float64)
            ratio = exp / (fixed[:, None] + per_tok * sizes[None, :])
            m_eff = np.minimum(ratio.argmax(axis=1) + 1, m_max)
        else:
            m_eff = np.ones(n_all, dtype=np.int64)  # (m_max >= 1)
        t_guess = max(self._t_running, t_floor)
        a = self._need(slack, tpot, t_guess, exp[:n_slo], dm) if n_slo else np.empty(0)
        m_min = np.ones(n_all, dtype=np.int64)
        if n_slo and dm:
            m_min[:n_slo] = np.minimum((exp[:n_slo] < (a[:, None] - 1e-9)).sum(axis=1) + 1, m_max[:n_slo])
        # The draft depth is shared: one level deeper costs the whole batch a draft step and
        # delays every decoder's next token. Pick the level whose iteration keeps the most SLO
        # decoders on their deadlines (A_i at that level's own length), then the most committed
        # tokens per second; a floor that no level reaches does not force a deeper tree.
        want = np.maximum(m_min, m_eff)
        nodes, t_lim = _choose_level(cost, want, exp, slack, hard, tpot, context, t_floor, t_cap, cfg.margin, cfg.safety)
        m_min = np.minimum(m_min, nodes)
        decode_tokens = int(nodes.sum())
        level = int(nodes.max(initial=1))
        while decode_tokens > lim.max_batch_tokens and level > 1:  # the engine's batch limit
            level -= 1
            nodes = np.minimum(nodes, level)
            decode_tokens = int(nodes.sum())
        steps = level - 1  # the deepest tree's draft steps (max(nodes) == level)
        b_max = min(lim.max_batch_tokens, cost.max_tokens_within(t_lim, steps, context, decode_tokens - n_all))
        b_max = max(b_max, decode_tokens)
        # Urgent prefill may stretch the iteration past t_cap, as far as the decoders allow.
        e_min = exp[np.arange(n_slo), m_min[:n_slo] - 1]
        t_stretch = max(t_lim, self._t_limit(hard, tpot, e_min, t_floor, cfg.max_iter_s, cfg.safety))
        if t_stretch > t_lim:
            b_fit = cost.max_tokens_within(t_stretch, steps, context, decode_tokens - n_all)
            b_stretch = max(min(lim.max_batch_tokens, b_fit), b_max)
        else:  # no stretch: the same budget
            b_stretch = b_max

        # ---- admission against TTFT deadlines (EDF + Moore-Hodgson) -----------------------
        decisions: list[protos.AdmissionDecision] = []
        if cfg.overload_shed:  # the costliest arrivals under overload: rejected on sight
            # distress: SLO decoders behind their deadlines, waiting requests past their TTFT
            behind = int((hard < 0).sum()) + past_ttft
            distress = behind / max(1, n_slo + len(waiting))
            shed = self._shed.decide(cost, acc, lim.max_depth if spec_on else 0, now, dec_all, distress)
            if shed:
                gone_now = set(shed)
                waiting = [r for r in waiting if r.rid not in gone_now]
                decisions.extend(protos.AdmissionDecision(rid, Decision.REJECT) for rid in shed
                                 if rid in st.requests and not st.requests[rid].is_admitted)
                self.counters["shed"] += len(shed)
        kv_left = st.kv_free_tokens - reserved
        capacity = b_stretch / t_stretch  # tokens / second at the longest allowed iteration
        base_load = int(m_min.sum()) / t_stretch  # efficiency extras give way to prefill (below)
        admitted_now, late = [], []
        if waiting:
            lead = cfg.ttft_lead_iters * t_lim
            jobs = [Job(r.ttft_deadline_s - lead, r.prompt_tokens - r.prefilled, 0.0, True) for r in slo_pre]
            fresh = []
            late_by, min_load = start + t_floor, 1.0 / t_lim  # TTFT deadline (s), decode load (1/s)
            for r in waiting:
                slo = r.slo
                ttft_deadline = r.arrival_s + slo.ttft_s  # r.ttft_deadline_s
                if slo.best_effort or ttft_deadline <= late_by:
                    late.append(r)
                else:
                    fresh.append(r)
                    load = 1.0 / (r.tpot_now * cfg.decode_efficiency)
                    jobs.append(Job(ttft_deadline - lead, r.prompt_tokens - r.prefilled, max(load, min_load)))
            self.counters["late"] += len(late)
            ok = admit_edf(jobs, start, capacity, base_load, cfg.admit_slack_s)
            feasible = [r for r, yes in zip(fresh, ok[len(slo_pre):]) if yes]
            self.counters["declined"] += len(fresh) - len(feasible)
            if cfg.decode_gate and feasible and dm:
                feasible = self._gate(ctx, feasible, slo_pre, exp, want, tpot, hard, nodes, steps, context, n_slo, dm)
            needs = [kv_need(r, cfg.new_token_ratio) for r in feasible]
            if cfg.kv_footprint_order and sum(needs) > kv_left:
                # KV binds: the most requests fit when the smallest KV x time footprints go first
                order = sorted(range(len(feasible)), key=lambda i: _kv_footprint(feasible[i]))
                feasible, needs = [feasible[i] for i in order], [needs[i] for i in order]
            free_now = st.kv_free_tokens - sum(r.prompt_tokens - r.prefilled for r in slo_pre)
            for r, need_kv in zip(feasible, needs):
                # A request whose cached prefix is already resident pins that KV while it waits;
                # admitting it (its new tokens fit in what is actually free) is what releases it.
                resident = cfg.admit_resident and r.cached_prefix_tokens > 0
                if need_kv <= kv_left or (resident and need_kv <= free_now):
                    kv_left -= need_kv
                    free_now -= need_kv
                    admitted_now.append(r)
                    if r.session_id:
                        self._sessions.add(r.session_id)
                    decisions.append(protos.AdmissionDecision(r.rid, _ADMIT))
                    self.counters["admitted"] += 1
                else:
                    self.counters["kv_blocked"] += 1

        # ---- prefill: SLO requests by EDF; efficiency extras give way to what TTFT needs ----
        edf = sorted(slo_pre + admitted_now, key=lambda r: r.ttft_deadline_s)
        lead = cfg.ttft_lead_iters * t_lim
        cum, rate_req = 0, 0.0  # tokens / second the EDF deadlines need
        for r in edf:
            cum += r.prompt_tokens - r.prefilled
            window = r.ttft_deadline_s - lead - start
            need_rate = cum / (window if window > t_lim else t_lim)
            if need_rate > rate_req:
                rate_req = need_rate
        p_req = min(cum, int(rate_req * t_lim) + 1)
        if edf:  # k chunks wait k iterations of >= t_floor each: finish the EDF head in one if
            # the decoders' deadlines allow (b_stretch); its early first token banks decode slack
            p_req = max(p_req, edf[0].prompt_tokens - edf[0].prefilled)
        split = st.mixed_forward  # else prefill-only forwards (prefill_only.py): no level cuts
        t_dec = t_pf_used = 0.0
        stalled = None
        if not split:
            t_dec = cost.iteration_time(0, decode_tokens, steps, context, decode_tokens - n_all) if n_all else 0.0
            if n_slo:
                stalled = prefill_only.Decoders(hard, tpot, left_tok[:n_slo], t_dec)
            head_wait = 0.0
            if edf:
                head = edf[0]
                head_wait = (head.ttft_deadline_s - lead - start - t_dec - cfg.prefill_keep_share * head.slo.ttft_s
                             - prefill_only.prefill_seconds(cost, head.prompt_tokens - head.prefilled))
            room, t_pf_used = prefill_only.slo_room(
                cost, lim.max_batch_tokens, [r.prompt_tokens - r.prefilled for r in edf], head_wait, stalled)
        elif decode_tokens + p_req > b_max and n_all:
            level = int(nodes.max(initial=1))
            while level > 1 and decode_tokens + p_req > b_max:
                level -= 1
                nodes = np.maximum(m_min, np.minimum(nodes, level))
                decode_tokens = int(nodes.sum())
                # a level cut frees its draft step too: re-price the budget at the new depth
                steps = int(nodes.max(initial=1)) - 1
                b_fit = cost.max_tokens_within(t_lim, steps, context, decode_tokens - n_all)
                b_max = max(b_max, min(lim.max_batch_tokens, b_fit))
            if decode_tokens + p_req > b_max:
                b_max = min(b_stretch, decode_tokens + p_req)
        if split:
            room = _prefill_room(cost, b_max - decode_tokens, b_max, decode_tokens, steps, context, n_all)
        packing = pack(edf, room, kv_left, cfg.new_token_ratio, preadmitted={r.rid for r in admitted_now})

        # ---- best-effort tier: preempt under KV pressure, else leftovers ------------------
        gone: set[str] = set()
        if kv_left < 0 and (be_dec or be_pre):
            for r in sorted(be_dec + be_pre, key=lambda r: -r.seq):
                if kv_left >= 0:
                    break
                decisions.append(protos.AdmissionDecision(r.rid, Decision.PREEMPT))
                kv_left += r.kv_tokens + kv_need(r, cfg.new_token_ratio)
                gone.add(r.rid)
        if cfg.reject_late:
            keep = []
            for r in late:
                if r.slo.best_effort or (r.session_id and cfg.keep_sessions):
                    keep.append(r)
                else:
                    decisions.append(protos.AdmissionDecision(r.rid, Decision.REJECT))
            late = keep
        late_queue = []
        if cfg.best_effort:
            late_queue = [r for r in be_pre if r.rid not in gone] + sorted(late, key=_seq_of)
            packing.kv_left = kv_left
            if not split:  # whole prompts that fit the forward (prefill_only.py)
                room = prefill_only.best_effort_room(cost, lim.max_batch_tokens,
                                                     [r.prompt_tokens - r.prefilled for r in late_queue],
                                                     packing.used, stalled, cfg.max_iter_s)
            pack(late_queue, room, kv_left, cfg.new_token_ratio, _BE, out=packing, head_of_line=False)
        else:
            decisions.extend(protos.AdmissionDecision(r.rid, Decision.REJECT) for r in late if not r.slo.best_effort)
        # Requests that arrive after this plan was made may prefill at once (the engine's own
        # way) when no request the planner knows still waits (they go first) and the decoders
        # absorb it: the prefill room this plan leaves unused (mixed forwards), or a prefill-only
        # forward within every reachable decoder's slack. Engines that ignore the field (the
        # simulator) plan and run exactly as without it.
        arrival_tokens = 0
        chunked = {c.rid: c.tokens for c in packing.chunks}
        # A waiting request not admitted now still waits unless it is late and chunked (best
        # effort); more of them than late ones settles it without counting the chunked ones.
        unplanned = len(waiting) - len(admitted_now)
        known_waiting = unplanned > len(late) or unplanned > sum(1 for r in late if r.rid in chunked) or any(
            chunked.get(r.rid, 0) < r.prompt_tokens - r.prefilled for r in (*edf, *late_queue))
        if not known_waiting:
            if split:
                arrival_tokens = max(0, room - packing.used)
            else:
                allow = stalled.allowance() if stalled is not None else math.inf
                if t_pf_used <= allow:
                    arrival_tokens = max(0, prefill_only.prefill_within(cost, allow, lim.max_batch_tokens) - packing.used)

        # ---- entries ---------------------------------------------------------------------
        if split:
            t_plan = cost.iteration_time(packing.used, decode_tokens, steps, context, decode_tokens - n_all)
        else:  # the next forward: the prefill alone if the plan has one, else the decode
            t_plan = cost.iteration_time(packing.used, 0, 0, 0) if packing.used else t_dec
        a_final = self._need(slack, tpot, t_plan, exp[:n_slo], dm) if n_slo else a
        min_tokens = np.where(a_final > 1.0, a_final, 1.0).tolist() + [1.0] * (n_all - n_slo)  # >= 1
        if lim.depth_tiers:
            snapped = {m: snap_depth(m - 1, lim, spec_on) for m in set(nodes.tolist())}  # per distinct size
            depth = np.fromiter(map(snapped.__getitem__, nodes.tolist()), dtype=np.int64, count=n_all)
        else:
            depth = nodes - 1
        spec = depth > 0  # a depth-0 entry is the root alone: one node, width 1
        decode = list(map(protos.DecodeEntry, all_rid, min_tokens, np.where(spec, nodes, 1).tolist(), depth.tolist(),
                          np.where(spec, w, 1).tolist()))
        if gone:
            decode = [e for e in decode if e.rid not in gone]
        budget = covering_budget(packing.used + decode_tokens, decode, packing.chunks, lim.max_batch_tokens)
        self._t_running = t_plan
        decisions.extend(packing.decisions)
        return protos.Plan(
            step=ctx.step,
            valid_until_s=0.0,
            token_budget=budget,
            prefill=packing.chunks,
            decode=decode,
            decisions=decisions,
            spec_depth=max((e.depth for e in decode), default=0) if lim.depth_tiers else -1,
            arrival_tokens=arrival_tokens,
        )

    def _gate(self, ctx: PlanContext, feasible, slo_pre, exp, want, tpot, hard, nodes, steps: int, context: int,
              n_slo: int, dm: int) -> list:
        """The TTFT-feasible newcomers the decode batch can also carry (decode_gate.py)."""
        cfg, cost = self.config, ctx.cost
        # Tightest pace among SLO decoders still worth saving (not seconds behind already).
        if n_slo:
            e_want = exp[np.arange(n_slo), want[:n_slo] - 1]
            pace = e_want * tpot
            alive = hard > -1.0
            live = pace[alive]
            if not live.size:
                t_allow = float("inf")
            elif cfg.gate_quantile > 0:
                t_allow = float(np.quantile(live, cfg.gate_quantile))
            else:
                t_allow = float(live.min())
            m_new = max(1, int(round(float(want[:n_slo].mean()))))
        else:
            t_allow, m_new = float("inf"), min(dm + 1, 4)
        t_allow *= cfg.gate_safety
        half = cfg.gate_output_tokens // 2

        def cand(r) -> GateCandidate:
            out = r.max_new_tokens - r.decoded
            e = 1.0 + chain_expected(ctx.acceptance.alphas(r.rid, m_new - 1), m_new - 1) if m_new > 1 else 1.0
            return GateCandidate(m_new, r.prompt_tokens + (out // 2 if out < 2 * half else half),
                                 cfg.gate_safety * e * r.tpot_now if cfg.gate_quantile <= 0 else float("inf"))

        # Prompts being prefilled decode soon: they are part of the batch to carry.
        pre_ctx = sum(r.prompt_tokens + min(r.max_new_tokens // 2, half) for r in slo_pre)
        base = GateLoad(int(nodes.sum()) + m_new * len(slo_pre), len(nodes) + len(slo_pre), context + pre_ctx,
                        max(steps, m_new - 1))
        duty = self._arrivals.rate(ctx.now_s) * (cost.k_tok_s + cost.k_knee_s) * cost.scale if cfg.gate_duty else 0.0
        order = sorted(feasible, key=lambda r: r.max_new_tokens) if cfg.gate_shortest_first else feasible
        seen = self._sessions
        exempt = [] if cfg.gate_sessions else [r for r in order if r.session_id in seen]
        if exempt:  # they join the batch first; the gate shares what is left among the rest
            ex = [cand(r) for r in exempt]
            base = GateLoad(base.nodes + sum(c.nodes for c in ex), base.seqs + len(ex),
                            base.context + sum(c.context for c in ex), base.steps)
            order = [r for r in order if r.session_id not in seen]
        ok = admit_decodes(cost, base, t_allow, duty, [cand(r) for r in order])
        passed = {r.rid for r, yes in zip(order, ok) if yes} | {r.rid for r in exempt}
        kept = [r for r in feasible if r.rid in passed]
        self.counters["gated"] += len(feasible) - len(kept)
        return kept

    def _need(self, slack: np.ndarray, tpot: np.ndarray, t: float, exp: np.ndarray, dm: int) -> np.ndarray:
        """A_i: expected tokens request i must commit in an iteration ending t after start."""
        a = 1.0 + (t - slack) / tpot + self.config.margin
        np.maximum(a, 1.0, out=a)
        np.minimum(a, exp[:, dm], out=a)
        return a

    @staticmethod
    def _t_limit(slack, tpot, e, t_floor, t_cap, safety) -> float:
        """Longest iteration (<= t_cap) keeping every SLO decoder on its deadlines when it
        commits e [n_slo] expected tokens."""
        if not len(slack):
            return max(t_floor, t_cap)
        t_ok = slack + (safety * e - 1.0) * tpot
        t_ok = t_ok[t_ok >= t_floor]  # requests already behind cannot be saved by a shorter T
        return max(t_floor, min(t_cap, float(t_ok.min()) if t_ok.size else t_cap))


def _choose_level(cost, want: np.ndarray, exp: np.ndarray, slack: np.ndarray, hard: np.ndarray, tpot: np.ndarray,
                  context: int, t_floor: float, t_cap: float, margin: float, safety: float) -> tuple[np.ndarray, float]:
    """The shared draft level: (nodes [n_all] = min(want, level), T_lim at that level).

    Every level L = max(want)..1 is scored at once as one [levels, n_all] computation (levels
    deepest first): its iteration length t_c (seconds), the SLO decoders on their deadlines at
    that length (A_i <= E_i[nodes]), T_lim (`_t_limit` row-wise) and the expected committed
    tokens per second. The first level with the largest (on track, fits T_lim, tokens/s) key
    wins, exactly as a level-by-level loop would pick it. want: [n_all] wished nodes (SLO
    decoders first, n_slo = len(slack)); exp: [n_all, D+1] expected committed tokens of
    1..D+1 nodes; slack, hard, tpot: [n_slo] seconds."""
    n_all, n_slo = len(want), len(slack)
    top = int(want.max(initial=1))
    levels = np.arange(top, 0, -1)  # [L], deepest first
    cand = np.minimum(want[None, :], levels[:, None])  # [L, n_all] nodes per request at each level
    totals = cand.sum(axis=1).tolist()  # [L] verify tokens; the deepest tree has `level` nodes
    t_c = [cost.iteration_time(0, tot, lv - 1, context, tot - n_all) for tot, lv in zip(totals, range(top, 0, -1))]
    # got[l, i] = exp[i, cand[l, i] - 1]: one take from the flattened rows
    row_m0 = np.arange(-1, n_all * exp.shape[1] - 1, exp.shape[1])  # [n_all] i * (D+1) - 1
    got = exp.reshape(-1).take(row_m0 + cand)  # [L, n_all] expected committed tokens
    e = got[:, :n_slo]  # [L, n_slo]
    t_col = np.array(t_c)[:, None]  # [L, 1] seconds
    on_track = ((t_col - slack) / tpot + (1.0 + margin) <= e + 1e-9).sum(axis=1).tolist()  # [L]
    # _t_limit per row: requests already behind (t_ok < t_floor) cannot be saved by a shorter T
    t_ok = hard + (safety * e - 1.0) * tpot  # [L, n_slo] seconds
    reach = np.where(t_ok >= t_floor, t_ok, np.inf).min(axis=1, initial=np.inf).tolist()  # [L]
    t_l = [max(t_floor, min(t_cap, r)) for r in reach]
    committed = got.sum(axis=1).tolist()  # [L] tokens (row sums: the same pairwise sums as got[l].sum())
    best, pick = None, 0
    for i, (tc, tl) in enumerate(zip(t_c, t_l)):
        key = (on_track[i], tc <= tl or tl <= t_floor, committed[i] / tc)  # tl == t_floor: no level fits
        if best is None or key > best:
            best, pick = key, i
    return cand[pick], t_l[pick]


def _floats(*lists: list) -> np.ndarray:
    """Lists of numbers, concatenated, as one float64 array (np.fromiter: cheaper than np.array
    on long lists, and one call for several columns)."""
    return np.fromiter(chain(*lists), dtype=np.float64, count=sum(map(len, lists)))


def _kv_footprint(r) -> float:
    """KV token-steps a request adds if admitted: its not-yet-resident prompt plus half its output,
    held for its output length (a cached prefix is held while it waits anyway)."""
    out = r.max_new_tokens - r.decoded
    return (r.prompt_tokens - r.prefilled + 0.5 * out) * max(1, out)


def _prefill_room(cost, room: int, b_max: int, decode: int, steps: int, context: int, n_all: int) -> int:
    """Shrink `room` prefill tokens until the iteration, with the prefill^2 attention term that
    max_tokens_within leaves out, takes no longer than a b_max-token batch would without it."""
    if room <= 0:
        return 0
    target = cost.iteration_time(0, b_max, steps, context, decode - n_all)
    t_dec = None  # the iteration without prefill, seconds (computed once, when first needed)
    for _ in range(4):
        t = cost.iteration_time(room, decode, steps, context, decode - n_all)
        if t <= target * 1.001:
            break
        if t_dec is None:
            t_dec = cost.iteration_time(0, decode, steps, context, decode - n_all)
        room = int(room * max(0.0, target - t_dec) / max(1e-9, t - t_dec))
    return max(0, room)


def make(**overrides) -> UnifiedPolicy:
    return UnifiedPolicy(build_config(UnifiedConfig, overrides, "slo_unified"))


__all__ = ["UnifiedConfig", "UnifiedPolicy", "make"]
