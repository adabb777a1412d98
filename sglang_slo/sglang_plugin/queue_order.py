"""Waiting-queue order: the plan's order first, then earliest deadline first.

Runs after SGLang's own `SchedulePolicy.calc_priority` (whose prefix matching has side
effects the prefill adder needs), as a stable in-place sort of the same list object.
"""

from __future__ import annotations

from sglang_slo.sglang_plugin.plan_state import PlanView
from sglang_slo.sglang_plugin.request_slo import deadline_key

_UNPLANNED = 1 << 30  # sorts after every planned request


def order_waiting_queue(waiting_queue: list, plan: PlanView | None, edf_fallback: bool) -> None:
    """Sort SGLang `Req`s in place: plan rank, then next deadline (seconds), then queue order.

    Without a plan, EDF applies only if `edf_fallback`; otherwise SGLang's order stands.
    """
    if plan is not None:
        rank = plan.rank
        waiting_queue.sort(key=lambda r: (rank.get(r.rid, _UNPLANNED), deadline_key(r)))
    elif edf_fallback:
        waiting_queue.sort(key=deadline_key)
