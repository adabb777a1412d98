"""Per-batch speculation depth from the plan, through SGLang's adaptive-speculation protocol.

SGLang 0.5.23 (EAGLE/EAGLE3, topk=1, `--speculative-adaptive`) pre-captures one runtime
state per candidate depth ("tier") and, before every decode forward, asks its policy
`get_steps_for_batch(bs)`. `SloStepPolicy` REPLACEs `eagle_worker_v2.AdaptiveSpeculativeParams`
(a subclass, so the module's other call sites and `candidate_steps` sizing keep working):
with a plan it returns the plan's `spec_depth` snapped to a captured tier; without one it is
SGLang's EMA policy unchanged. Acceptance feedback only moves the EMA when no plan rules.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

from sglang.srt.speculative.adaptive_spec_params import AdaptiveSpeculativeParams

from sglang_slo.sglang_plugin.plan_state import PlanView


def snap_to_tier(depth: int, tiers: list[int]) -> int:
    """The deepest captured tier not deeper than `depth` (the shallowest if all are deeper)."""
    tiers = sorted(tiers)
    i = bisect.bisect_right(tiers, depth) - 1
    return tiers[max(i, 0)]


class SloStepPolicy(AdaptiveSpeculativeParams):
    """`AdaptiveSpecPolicy` whose depth is the planner's batch-wide `Plan.spec_depth`."""

    plan_source: Callable[[], PlanView | None] = staticmethod(lambda: None)
    """Returns the plan in force in this process (set by the plugin's scheduler state)."""

    def get_steps_for_batch(self, batch_size: int) -> int:
        plan = type(self).plan_source()
        if plan is None or plan.spec_depth < 0:
            return super().get_steps_for_batch(batch_size)
        slot = self._route(batch_size)  # only this slot's tiers are captured for this bs
        return snap_to_tier(plan.spec_depth, slot.candidate_steps)

    def on_verify_complete(self, num_correct_drafts_per_req: list[int], batch_size: int) -> int | None:
        switch = super().on_verify_complete(num_correct_drafts_per_req, batch_size)
        plan = type(self).plan_source()
        return None if plan is not None and plan.spec_depth >= 0 else switch
