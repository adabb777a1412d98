"""The plan a scheduler applies, identical on every TP rank.

Pure state, no sockets and no clocks: rank 0 decides *when* a plan arrives or expires and
that decision reaches every rank as a `PlannerUpdate` through SGLang's request broadcast,
so all ranks hold the same `PlanState` at the same point of the loop (a rank-local clock
read would let ranks disagree and hang the collectives).
"""

from __future__ import annotations

import dataclasses

from protos.messages import Decision, Plan


@dataclasses.dataclass
class PlannerUpdate:
    """What rank 0 learned from the planner since the last loop pass (rides the broadcast).

    Dispatched by SGLang's `TypeBasedDispatcher` on every rank; must stay picklable.
    """

    plan: Plan | None = None
    """The newest plan received (older ones in the same pass are superseded)."""
    expire: bool = False
    """The current plan's `valid_until_s` has passed on rank 0's clock: fall back."""
    now_s: float | None = None
    """Rank 0's clock at this pass (TP > 1): every rank stamps new arrivals with it, so
    deadline order is identical on every rank."""


@dataclasses.dataclass(frozen=True)
class PlanView:
    """A plan digested for the batch builder (lookups by request id)."""

    step: int
    """`Plan.step`: reported back as `IterationReport.plan_step`."""
    token_budget: int
    """Most tokens in one forward (prefill chunks + verify tokens)."""
    prefill_tokens: dict[str, int]
    """rid -> prompt tokens to prefill this iteration; insertion order = priority order."""
    decisions: dict[str, Decision]
    """rid -> the planner's latest admission decision."""
    rank: dict[str, int]
    """rid -> position in the plan's order (prefill list first, then decode list)."""
    spec_depth: int
    """Batch-wide speculation depth (-1 = let the engine decide)."""
    based_on_step: int
    """Last engine step the planner had seen; requests that arrived later are unplanned."""
    arrival_tokens: int = 0
    """`Plan.arrival_tokens`: prompt tokens of requests the plan does not know (not in `rank`)
    one prefill may take at once, SGLang's way; one-shot like the chunks."""

    @classmethod
    def of(cls, plan: Plan) -> PlanView:
        prefill = {}
        for chunk in plan.prefill:
            if chunk.tokens > 0:
                prefill[chunk.rid] = prefill.get(chunk.rid, 0) + chunk.tokens
        rank: dict[str, int] = {}
        for rid in [c.rid for c in plan.prefill] + [d.rid for d in plan.decode]:
            rank.setdefault(rid, len(rank))
        return cls(
            step=plan.step,
            token_budget=plan.token_budget,
            prefill_tokens=prefill,
            decisions={d.rid: d.decision for d in plan.decisions},
            rank=rank,
            spec_depth=plan.spec_depth,
            based_on_step=plan.based_on_step,
            arrival_tokens=max(0, plan.arrival_tokens),
        )

    def wants_prefill(self) -> bool:
        """Whether this iteration should build a prefill batch for the plan's own chunks."""
        return bool(self.prefill_tokens)

    def admits_arrival(self, rid: str) -> bool:
        """Whether a waiting request `rid` may prefill now as an arrival the plan does not know."""
        return self.arrival_tokens > 0 and rid not in self.rank

    def without_chunks(self, rids) -> PlanView:
        """This plan with the prefill chunks of `rids` taken out (they ran); order and
        decisions stay."""
        left = {rid: n for rid, n in self.prefill_tokens.items() if rid not in rids}
        return dataclasses.replace(self, prefill_tokens=left)


class PlanState:
    """The scheduler's current plan (or none: SGLang's own behaviour applies).

    A plan is for one iteration, but stays in force until a newer one arrives or it expires
    (the planner's reply to the next report is usually an iteration or more away). Its prefill
    chunks are one-shot: once a launched batch ran a request's planned chunk, `consume` takes
    it out, so an iteration that reuses the plan does not prefill that request again (the
    planner counted the chunk once; the next chunk is the next plan's call). The plan's
    order, decisions, budget and speculation depth stand until it is replaced or expires.
    """

    def __init__(self) -> None:
        self.view: PlanView | None = None
        self.plans_applied = 0
        self.plans_expired = 0
        self.expired = False
        """The last plan expired (as opposed to no plan ever received)."""
        self.chunks_consumed = 0
        self.arrivals_admitted = 0
        """Prefill forwards that ran arrivals under a plan's `arrival_tokens`."""

    def apply(self, update: PlannerUpdate) -> None:
        """Install a newer plan and/or expire the current one (same effect on every rank)."""
        if update.plan is not None and (self.view is None or update.plan.step >= self.view.step):
            self.view = PlanView.of(update.plan)
            self.plans_applied += 1
            self.expired = False
        elif update.expire and self.view is not None:
            self.view = None
            self.plans_expired += 1
            self.expired = True

    def consume(self, rids) -> None:
        """The current plan's chunks for `rids` ran in a launched batch: not again under this plan.
        Any prefill forward under the plan uses up its arrival allowance too: the planner priced
        one prefill forward's stall of the running decoders, not one per iteration it stays in force."""
        view = self.view
        if view is None or not rids:
            return
        done = [rid for rid in rids if rid in view.prefill_tokens]
        if done:
            view = self.view = view.without_chunks(done)
            self.chunks_consumed += len(done)
        if view.arrival_tokens > 0:
            self.view = dataclasses.replace(view, arrival_tokens=0)
            self.arrivals_admitted += any(rid not in view.rank for rid in rids)

    @property
    def step(self) -> int:
        """`Plan.step` of the plan in force, -1 under the fallback."""
        return self.view.step if self.view is not None else -1
