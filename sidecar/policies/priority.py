"""`priority`: SGLang priority scheduling: fcfs mechanics, ordered by `Slo.priority`.

Waiting and running requests are served by priority (larger first), then arrival. When the
most important waiting request does not fit in KV, running requests of strictly lower
priority are preempted (lowest priority, latest arrival first), as SGLang's
`--enable-priority-scheduling` with preemption does.
"""

from __future__ import annotations

from sidecar.policies.base import build_config
from sidecar.policies.fcfs import FcfsConfig, FcfsPolicy
from sidecar.state import ReqState


def _key(r: ReqState) -> tuple[int, int]:
    return (-r.slo.priority, r.seq)


class PriorityPolicy(FcfsPolicy):
    name = "priority"

    def order(self, reqs: list[ReqState]) -> list[ReqState]:
        reqs.sort(key=_key)  # the lists come fresh from PlannerState views: sort in place
        return reqs

    def make_room(self, waiting: ReqState, deficit: int, running: list[ReqState], gone: set[str]) -> list[ReqState]:
        victims, freed = [], 0
        # `running` is in priority order: walk it from the back (lowest priority, latest).
        for v in reversed(running):
            if freed >= deficit or v.slo.priority >= waiting.slo.priority:
                break
            if v.rid in gone:
                continue
            victims.append(v)
            freed += v.prefilled + v.decoded + self.reservation(v)
        return victims if freed >= deficit else []


def make(**overrides) -> PriorityPolicy:
    return PriorityPolicy(build_config(FcfsConfig, overrides, "priority"))
