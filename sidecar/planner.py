"""`Planner`: the pure core of the sidecar. `observe(msg)` updates state; `plan(now)` decides.

No sockets, no clocks of its own (times come in as arguments), no I/O beyond logging.
`PlannerProc` (proc.py) wraps it with the ZMQ loop; the simulator drives it directly.
"""

from __future__ import annotations

import copy
import logging
import time
from operator import attrgetter
from pathlib import Path
from typing import Any

from protos import messages as protos
from sidecar.acceptance import AcceptanceModel
from sidecar.cost_model import CostModel, EngineLimits, HardwareProfile, load_profile
from sidecar.policies.base import PlanContext, Policy, make_policy
from sidecar.state import ADMITTED, PlannerState, ReqState

log = logging.getLogger(__name__)

Decision = protos.Decision
_rid_of = attrgetter("rid")
_cap_of = attrgetter("tree_cap")
_depth_of = attrgetter("depth")
_tokens_of = attrgetter("tokens")
_PLANS_REMEMBERED = 32  # plan steps whose planning time is kept for the lag measurement
_LAG_MARGIN = 1.25  # the adaptive horizon covers the lag envelope with this margin
_LAG_HALF_LIFE_S = 1.0  # engine seconds for a lag spike to count half


class Planner:
    """State + cost model + acceptance model + one policy."""

    def __init__(
        self,
        policy: Policy,
        profile: HardwareProfile,
        horizon_iters: float = 4.0,
        min_horizon_s: float = 0.005,
        max_horizon_s: float = 0.05,
    ):
        """horizon_iters: a plan stays valid for this many predicted iterations after `now`
        (at least `min_horizon_s` seconds); with `adaptive_horizon`, at least as long as the
        engine has recently had to wait for a newer plan (at most `max_horizon_s` for that part)."""
        self.policy = policy
        self.profile = profile
        self.cost: CostModel = copy.deepcopy(profile.cost)  # refit online; the profile stays as loaded
        self.acceptance = AcceptanceModel(profile.acceptance_priors)
        self.state = PlannerState(limits=profile.engine)
        self.horizon_iters = horizon_iters
        self.min_horizon_s = min_horizon_s
        self.max_horizon_s = max_horizon_s
        self.extra_horizon_iters = 0.0
        """Predicted iterations added to every plan's validity: the sidecar sets it to how many
        steady reports it may leave unanswered (PlannerProc.steady_skips), so the plan in force
        outlives them."""
        self.adaptive_horizon = False
        """True: the horizon also covers the measured plan lag (`plan_lag_s`). The sidecar turns
        it on for real engines, whose plans arrive whenever the sidecar gets CPU time; the
        simulator's plans arrive on a fixed schedule, so in-process planning keeps it off."""
        self.plan_lag_s = 0.0
        """Envelope of plan ages at iteration start (engine clock, decays by half per
        `_LAG_HALF_LIFE_S`): how old the newest plan was when the engine started an iteration."""
        self._plan_made_s: dict[int, float] = {}
        """Plan step -> the `now_s` it was planned at (the last `_PLANS_REMEMBERED`)."""
        self._lag_prev_end_s: float | None = None
        """end_s of the previous report (an idle gap before an iteration is not plan lag)."""
        self._lag_t = 0.0
        """Engine time of the last `plan_lag_s` update."""
        self.plans_apply_late = False
        """True: the engine applies a plan when it arrives, which can be a step after the one
        it was made for (SGLang on CPU: the forward of step k + 1 is over before report k is
        even sent, so plan k + 2 arrives during k + 2 and runs in k + 3); the reports' plan_step
        tells which plan ran. The sidecar turns it on for real engines."""
        self._applied_step = -1
        """Newest plan step an engine report said it applied (plans_apply_late)."""
        self.skipped_unknown = 0
        """Messages about rids the planner does not know (logged, skipped)."""
        self.enforce_contract = True
        """Repair plans that break the policy contract (logged; counted in contract_fixes)."""
        self.contract_fixes = 0
        """Plans the planner had to repair."""
        self.defer_upkeep = False
        """True: model upkeep (acceptance updates, cost refit) waits for `upkeep()` instead of
        running in observe(): the sidecar plans first and learns after sending the plan."""
        self._pending_verifies: list[tuple[ReqState, protos.RequestProgress]] = []
        """Verify outcomes observed but not yet applied to the acceptance model (defer_upkeep)."""
        self._inflight: list[protos.Plan] = []
        """Plans sent for steps the engine has not reported yet (pipelining)."""
        self._last_plan: protos.Plan | None = None
        self._events_since_plan = True
        """Something besides decode progress happened since the last plan (see `steady`)."""

    @classmethod
    def create(cls, policy: str, hardware: str | Path | HardwareProfile, **policy_overrides: Any) -> "Planner":
        """Planner running policy `policy` (a make_policy name) on a hardware profile (path or object).

        The profile's `policy_defaults[policy]` apply first; `policy_overrides` win."""
        profile = hardware if isinstance(hardware, HardwareProfile) else load_profile(hardware)
        options = {**profile.policy_defaults.get(policy, {}), **policy_overrides}
        return cls(make_policy(policy, **options), profile)

    # ---- events -----------------------------------------------------------------------

    def observe(self, msg: protos.Message) -> None:
        """Apply one engine message. Unknown rids are logged and skipped, never fatal."""
        st = self.state
        if isinstance(msg, protos.IterationReport):
            if msg.prefill_tokens:
                self._events_since_plan = True
            self._observe_report(msg)
            if self.adaptive_horizon:
                self._observe_plan_lag(msg)
            self.policy.observe(msg)
            return
        self._events_since_plan = True
        if isinstance(msg, protos.RequestArrived):
            if msg.rid in st.requests:
                log.warning("planner: duplicate arrival of %r ignored", msg.rid)
                return
            st.add(msg)
            self.acceptance.register(msg.rid, msg.slo.slo_class)
            if msg.arrival_s > st.now_s:
                st.now_s = msg.arrival_s
        elif isinstance(msg, protos.RequestFinished):
            self._learn_verifies()  # its last outcomes count before its estimate is dropped
            if st.requests.pop(msg.rid, None) is None:
                self._skip(msg.rid, "finished")
            self.acceptance.forget(msg.rid)
            if msg.finish_s > st.now_s:
                st.now_s = msg.finish_s
        elif isinstance(msg, protos.EngineHello):
            st.limits = EngineLimits.from_hello(msg)
            st.engine = msg.engine
            st.spec_modes = tuple(msg.spec_modes) or (protos.SpecMode.NONE,)
            st.kv_free_tokens = msg.kv_capacity_tokens
            st.mixed_forward = msg.mixed_forward
        elif isinstance(msg, protos.Resync):
            self._resync(msg)
        else:
            log.warning("planner: ignoring unexpected %s", type(msg).__name__)
            return
        self.policy.observe(msg)

    def _observe_report(self, rep: protos.IterationReport) -> None:
        st = self.state
        st.step = rep.step
        if rep.end_s > st.now_s:
            st.now_s = rep.end_s
        st.kv_free_tokens = rep.kv_free_tokens
        st.last_report = rep
        find = st.requests.get
        self._learn_verifies()  # upkeep() was not called since the last report
        verified = self._pending_verifies.append
        for p in rep.progress:
            req = find(p.rid)
            if req is None:
                self._skip(p.rid, "progress")
                continue
            req.apply_progress(p)
            if p.depth > 0:
                verified((req, p))
        if not self.defer_upkeep:
            self._learn_verifies()
        self.cost.observe(rep, defer_refit=self.defer_upkeep)
        self._project_inflight(self._projection_floor(rep))

    def _project_inflight(self, step: int) -> None:
        """Count prefill chunks of plans for steps after `step` as done: the engine is running
        them while we plan (pipelining), so planning from the report alone would schedule the
        same prompt tokens twice. Projections are rebuilt from the last reported facts at
        every report, so a chunk the engine never ran (its plan was replaced, KV was full)
        stops counting once its step is reported, and no chunk is counted twice."""
        find = self.state.requests.get
        for plan in self._inflight:  # back to facts for everything projected so far
            for c in plan.prefill:
                req = find(c.rid)
                if req is not None:
                    req.prefilled = req.reported_prefilled
        self._inflight = [p for p in self._inflight if p.step > step]
        for plan in self._inflight:
            for c in plan.prefill:
                req = find(c.rid)
                if req is not None and req.decision in ADMITTED:
                    n = min(c.tokens, req.prompt_tokens - req.prefilled)
                    if n > 0:
                        req.prefilled += n
                        self.state.kv_free_tokens -= n

    def _projection_floor(self, rep: protos.IterationReport) -> int:
        """Plans for steps after this one may still run. With `plans_apply_late`, a plan for
        the reported step that the engine has not applied yet (it applied an older one, its
        reply came late) may run in the next step, so its chunks keep counting one step more."""
        if not self.plans_apply_late:
            return rep.step
        if rep.plan_step > self._applied_step:
            self._applied_step = rep.plan_step
        return rep.step - 1 if self._applied_step < rep.step else rep.step

    def _resync(self, msg: protos.Resync) -> None:
        st = PlannerState(limits=self.state.limits, engine=self.state.engine, spec_modes=self.state.spec_modes,
                          mixed_forward=self.state.mixed_forward)
        st.now_s, st.step, st.kv_free_tokens = msg.now_s, msg.step, msg.kv_free_tokens
        self._learn_verifies()  # the class estimates keep them; request estimates restart
        self.acceptance.clear_requests()
        for snap in msg.requests:
            req = st.add(snap.arrived)
            req.prefilled = req.reported_prefilled = max(req.prefilled, snap.prefilled)
            req.decoded = snap.decoded
            req.first_token_s = snap.first_token_s
            req.stage = snap.stage
            req.stage_starts = [0] + [snap.decoded] * snap.stage
            req.decision = Decision(snap.decision)
            self.acceptance.register(req.rid, req.slo.slo_class)
        self.state = st
        self._inflight.clear()
        self._applied_step = -1
        self.policy.reset()

    def _skip(self, rid: str, what: str) -> None:
        self.skipped_unknown += 1
        if self.skipped_unknown <= 10 or self.skipped_unknown % 1000 == 0:
            log.warning("planner: %s for unknown request %r skipped (%d so far)", what, rid, self.skipped_unknown)

    def upkeep(self) -> None:
        """Model maintenance, off the plan's critical path (the sidecar calls it after sending
        a plan): deferred acceptance updates, then one slice of the cost model's windowed refit
        when one is due or running (CostModel.refit_step)."""
        self._learn_verifies()
        self.cost.refit_step()

    def _learn_verifies(self) -> None:
        """Apply deferred verify outcomes to the acceptance model (at most one report old)."""
        pending = self._pending_verifies
        if pending:
            observe = self.acceptance.observe
            for req, p in pending:
                observe(req.rid, req.slo.slo_class, p)
            pending.clear()

    # ---- planning ---------------------------------------------------------------------

    def plan(self, now_s: float, step: int | None = None) -> protos.Plan:
        """The plan for engine step `step` (default: last reported step + 2, since the engine
        is already running the next one). Stamps latency, based_on_step and valid_until_s,
        and records the plan's admission decisions in the state."""
        t_start = time.perf_counter()
        st = self.state
        if step is None:
            step = st.step + 2
        ctx = PlanContext(state=st, cost=self.cost, acceptance=self.acceptance, now_s=now_s, step=step)
        plan = self.policy.plan(ctx)
        self._apply_decisions(plan)
        if self.enforce_contract:
            self._enforce_contract(plan)
        plan.step = step
        plan.based_on_step = st.step
        if plan.valid_until_s <= now_s:
            plan.valid_until_s = now_s + self._horizon_s(plan)
        if self.adaptive_horizon:
            made = self._plan_made_s
            made[step] = now_s
            if len(made) > _PLANS_REMEMBERED:
                del made[next(iter(made))]
        self._last_plan, self._events_since_plan = plan, False
        self._inflight = [p for p in self._inflight if p.step != step]  # a replan replaces
        self._inflight.append(plan)
        if len(self._inflight) > 8:  # engine not reporting plan steps as expected: bound it
            del self._inflight[0]
        plan.plan_latency_s = time.perf_counter() - t_start
        return plan

    def steady(self) -> bool:
        """Whether the policy would plan the same decode iteration again: since the last plan,
        which had no prefill chunk and no decision, only decode progress was reported (no
        arrival, finish, resync, prefill), no request waits or prefills, and the engine does
        not speculate (trees follow each decoder's slack, which moves every iteration). The
        last plan then still stands (it is valid for several predicted iterations), save for
        how its arrival allowance drifts with the decoders' slack. O(requests)."""
        last = self._last_plan
        if self._events_since_plan or last is None or last.prefill or last.decisions or self.state.spec_enabled:
            return False
        admit, best = Decision.ADMIT, Decision.BEST_EFFORT
        n = 0
        for r in self.state.requests.values():
            if not (r.decision is admit or r.decision is best) or r.prefilled < r.prompt_tokens:
                return False
            n += 1
        return n == len(last.decode)

    def _apply_decisions(self, plan: protos.Plan) -> None:
        requests = self.state.requests
        dropped = 0
        for d in plan.decisions:
            req: ReqState | None = requests.get(d.rid)
            if req is None:
                continue
            if req.is_admitted and d.decision in (Decision.DEFER, Decision.REJECT):
                dropped += 1  # contract: an admitted request stays admitted
                continue
            if d.decision == Decision.REJECT:
                req.decision = Decision.REJECT  # the engine fails it; RequestFinished removes it
            elif d.decision == Decision.PREEMPT:
                req.preempted(req.cached_prefix_tokens)  # KV freed; prompt + output recomputed later
            else:
                req.decision = Decision(d.decision)
        if dropped:
            plan.decisions = [
                d for d in plan.decisions
                if not (d.decision in (Decision.DEFER, Decision.REJECT) and d.rid in requests and requests[d.rid].is_admitted)
            ]
            self._contract_fix(f"{dropped} DEFER/REJECT decision(s) for admitted requests dropped")

    def _enforce_contract(self, plan: protos.Plan) -> None:
        """Repair a plan that breaks the policy contract (policies/base.py), so a policy bug
        costs quality, not requests: chunks only for admitted requests and at most their
        remaining prefill; one decode entry (tree_cap >= 1) per decoding request, none for
        others, or none at all in a prefill-only plan (SGLang's default iteration); prefill +
        one token per decode entry within the budget, and the budget within the engine's
        max_batch_tokens (unless the decode entries alone exceed it).
        O(n) with set operations on the common (valid) path."""
        requests = self.state.requests
        admit, best = Decision.ADMIT, Decision.BEST_EFFORT
        fixes: list[str] = []
        decode = plan.decode
        prefill_only = bool(plan.prefill) and not decode  # running requests wait one iteration
        decoding: set[str] = set() if prefill_only else {  # not needed to check a prefill-only plan
            rid for rid, r in requests.items()
            if (r.decision is admit or r.decision is best) and r.prefilled >= r.prompt_tokens
        }
        entry_rids = set(map(_rid_of, decode))
        if not prefill_only and (len(entry_rids) != len(decode) or entry_rids != decoding
                                 or (decode and min(map(_cap_of, decode)) < 1)):
            kept, seen = [], set()
            for e in decode:
                if e.rid in decoding and e.rid not in seen:
                    seen.add(e.rid)
                    if e.tree_cap < 1:
                        e.tree_cap = 1
                    kept.append(e)
            missing = [rid for rid in decoding if rid not in seen]
            kept.extend(protos.DecodeEntry(rid) for rid in missing)
            fixes.append(f"decode entries: {len(decode) - len(seen)} dropped, {len(missing)} missing added")
            decode = kept
        chunks = []
        for c in plan.prefill:
            r = requests.get(c.rid)
            rest = 0 if r is None or not (r.decision is admit or r.decision is best) else r.prompt_tokens - r.prefilled
            if c.tokens > rest or c.tokens <= 0:
                fixes.append(f"chunk {c.rid}:{c.tokens} (remaining {rest})")
                if rest > 0 and c.tokens > 0:
                    chunks.append(protos.PrefillChunk(c.rid, rest))
            else:
                chunks.append(c)
        if plan.token_budget < len(decode):
            fixes.append(f"budget {plan.token_budget} < {len(decode)} decode entries")
            plan.token_budget = len(decode)
        cap = max(self.state.limits.max_batch_tokens, len(decode))
        if plan.token_budget > cap:
            fixes.append(f"budget {plan.token_budget} > engine max_batch_tokens {cap}")
            plan.token_budget = cap
        room = plan.token_budget - len(decode)
        total = 0
        for i, c in enumerate(chunks):
            if total + c.tokens > room:
                fixes.append(f"prefill over budget from {c.rid}")
                if room - total > 0:
                    chunks[i] = protos.PrefillChunk(c.rid, room - total)
                    i += 1
                del chunks[i:]
                break
            total += c.tokens
        if fixes:
            plan.prefill, plan.decode = chunks, decode
            self._contract_fix("; ".join(fixes[:5]) + (f" (+{len(fixes) - 5} more)" if len(fixes) > 5 else ""))

    def _contract_fix(self, what: str) -> None:
        self.contract_fixes += 1
        if self.contract_fixes <= 10 or self.contract_fixes % 1000 == 0:
            log.warning("planner: policy %s broke the plan contract (%d plans so far): %s",
                        self.policy.name, self.contract_fixes, what)

    def _horizon_s(self, plan: protos.Plan) -> float:
        """Validity horizon: `horizon_iters` predicted iterations of this plan (one pass)."""
        verify = sum(map(_cap_of, plan.decode))
        steps = max(map(_depth_of, plan.decode), default=0)
        prefill = sum(map(_tokens_of, plan.prefill))
        rep = self.state.last_report
        ctx_tokens = rep.context_tokens if rep is not None else 0  # last measured; close enough here
        t_iter = self.cost.iteration_time(prefill, min(verify, plan.token_budget), steps, ctx_tokens, verify - len(plan.decode))
        horizon = max(self.min_horizon_s, (self.horizon_iters + self.extra_horizon_iters) * t_iter)
        if self.adaptive_horizon:
            horizon = max(horizon, min(self.max_horizon_s, _LAG_MARGIN * self.plan_lag_s))
        return horizon

    def _observe_plan_lag(self, rep: protos.IterationReport) -> None:
        """Update `plan_lag_s` from one report of a busy engine (the iteration started where
        the previous one ended): the age, at the iteration's start, of the plan the engine
        applied or, for an iteration that fell back, of the newest plan made before it started
        (it had expired or not arrived yet). An iteration after an idle gap is skipped: no plan
        was needed while idle, so that age says nothing about how late plans arrive."""
        start, prev_end = rep.start_s, self._lag_prev_end_s
        self._lag_prev_end_s = rep.end_s
        if prev_end is None or start - prev_end > self.min_horizon_s:
            return
        if rep.plan_step >= 0:
            made_s = self._plan_made_s.get(rep.plan_step)
        else:
            made_s = max((t for t in self._plan_made_s.values() if t <= start), default=None)
        if made_s is None:
            return
        lag = self.plan_lag_s
        if lag > 0.0:  # decay towards the new sample: a spike counts half after one half-life
            lag *= 0.5 ** (max(start - self._lag_t, 0.0) / _LAG_HALF_LIFE_S)
        self.plan_lag_s = max(start - made_s, lag)
        self._lag_t = start
