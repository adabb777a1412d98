"""The hook functions, each small and named after what it changes, and their registration.

Every hook delegates to the scheduler's `SloSchedulerState` (`scheduler_state.py`); the
pure pieces live in `plan_state`, `queue_order`, `prefill_adder`, `spec_policy`,
`iteration_report` and `request_slo`. Targets and signatures: `targets.py`.
"""

from __future__ import annotations

import logging

from sglang_slo.sglang_plugin.plan_state import PlannerUpdate
from sglang_slo.sglang_plugin.scheduler_state import SloSchedulerState, current_plan, current_state

log = logging.getLogger(__name__)

_SCHED = "sglang.srt.managers.scheduler.Scheduler"
_POLICY = "sglang.srt.managers.schedule_policy.SchedulePolicy"
_SPEC = "sglang.srt.speculative.eagle_worker_v2.AdaptiveSpeculativeParams"


def route_planner_updates(result, self):
    """AFTER Scheduler.init_request_dispatcher: create the state; dispatch PlannerUpdate to it."""
    from sglang.utils import TypeBasedDispatcher

    self.slo_state = SloSchedulerState(self)
    self._request_dispatcher += TypeBasedDispatcher([(PlannerUpdate, self.slo_state.apply_update)])


def attach_request_slo(req, self, recv_req, *args, **kwargs):
    """AFTER Scheduler._create_generation_req: parse the SLO into deadlines on `req.slo`."""
    self.slo_state.on_new_request(req)
    return req


def poll_planner(aborts, self):
    """AFTER Scheduler._poll_timeout_aborts (rank 0): planner updates join the broadcast list."""
    return list(aborts) + self.slo_state.poll()


def defer_prefill_by_plan(original, self, running_batch):
    """AROUND Scheduler._should_defer_prefill: the plan decides prefill vs decode."""
    return self.slo_state.should_defer_prefill(original, running_batch)


def plan_prefill_adder(original, self):
    """AROUND Scheduler.get_prefill_adder_class: SloPrefillAdder bound to the plan in force."""
    from sglang_slo.sglang_plugin.prefill_adder import SloPrefillAdder

    base = original(self)
    if base is not SloPrefillAdder.__mro__[1]:  # someone else customised the adder: keep theirs
        return base
    return SloPrefillAdder.bind(self.slo_state.plan_for_build())


def order_queue_by_plan(original, self, waiting_queue, running_batch=None, processed_tokens=0):
    """AROUND SchedulePolicy.calc_priority: SGLang's sort, then plan order / EDF."""
    from sglang_slo.sglang_plugin.queue_order import order_waiting_queue

    original(self, waiting_queue, running_batch, processed_tokens)
    state = current_state()
    if state is not None:
        order_waiting_queue(waiting_queue, state.plan_for_build(), state.edf_fallback)


def remember_plan_of_batch(result, self, batch, pp_proxy_tensors=None):
    """AFTER Scheduler.run_batch: the plan's chunks that ran are used up; (rank 0) which plan built it."""
    self.slo_state.after_launch(batch)


def report_iteration(result, self, batch, batch_result):
    """AFTER Scheduler.process_batch_result (rank 0): IterationReport to the planner."""
    if self.slo_state.leader():
        self.slo_state.report(batch, batch_result)


def register_hooks() -> None:
    """Register every hook with SGLang's HookRegistry (applied by `load_plugins()`)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from sglang_slo.sglang_plugin.spec_policy import SloStepPolicy

    SloStepPolicy.plan_source = staticmethod(current_plan)
    for target, hook, kind in (
        (f"{_SCHED}.init_request_dispatcher", route_planner_updates, HookType.AFTER),
        (f"{_SCHED}._create_generation_req", attach_request_slo, HookType.AFTER),
        (f"{_SCHED}._poll_timeout_aborts", poll_planner, HookType.AFTER),
        (f"{_SCHED}._should_defer_prefill", defer_prefill_by_plan, HookType.AROUND),
        (f"{_SCHED}.get_prefill_adder_class", plan_prefill_adder, HookType.AROUND),
        (f"{_SCHED}.run_batch", remember_plan_of_batch, HookType.AFTER),
        (f"{_SCHED}.process_batch_result", report_iteration, HookType.AFTER),
        (f"{_POLICY}.calc_priority", order_queue_by_plan, HookType.AROUND),
        (_SPEC, SloStepPolicy, HookType.REPLACE),
    ):
        HookRegistry.register(target, hook, kind)
