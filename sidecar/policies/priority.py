"""`priority`: SGLang priority scheduling: fcfs mechanics, ordered by `Slo.priority`.

Waiting and running requests are served by priority (larger first), then arrival. When the
most important waiting request does not fit in KV, running requests whose priority is lower
by more than `preempt_threshold` are preempted (lowest priority, latest arrival first), as
SGLang's `--enable-priority-scheduling` with preemption does
(`--priority-scheduling-preemption-threshold`, SGLang default 10; 0 here because SLO classes
use small priorities).
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.policies.base import build_config
from sidecar.policies.fcfs import FcfsConfig, FcfsPolicy
from sidecar.state import ReqState


@dataclass(frozen=True)
class PriorityConfig(FcfsConfig):
    preempt_threshold: int = 0
    """Preempt a running request only if its priority is lower by more than this."""
    preemption: bool = True
    """False: never preempt (SGLang --disable-priority-preemption)."""


class PriorityPolicy(FcfsPolicy):
    name = "priority"
    config: PriorityConfig

    def order(self, reqs: list[ReqState]) -> list[ReqState]:
        """Priority descending, then arrival: a stable bucket pass, O(n) for few priorities
        (the input is in arrival order)."""
        buckets: dict[int, list[ReqState]] = {}
        for r in reqs:
            p = r.slo.priority
            b = buckets.get(p)
            if b is None:
                buckets[p] = [r]
            else:
                b.append(r)
        if len(buckets) <= 1:
            return reqs
        out: list[ReqState] = []
        for p in sorted(buckets, reverse=True):
            out.extend(buckets[p])
        return out

    def make_room(self, waiting: ReqState, deficit: int, running: list[ReqState], gone: set[str]) -> list[ReqState]:
        if not self.config.preemption:
            return []
        victims, freed = [], 0
        bar = waiting.slo.priority - self.config.preempt_threshold  # victims: priority < bar
        # `running` is in priority order: walk it from the back (lowest priority, latest).
        for v in reversed(running):
            if freed >= deficit or v.slo.priority >= bar:
                break
            if v.rid in gone:
                continue
            victims.append(v)
            freed += v.prefilled + v.decoded + self.reservation(v)
        return victims if freed >= deficit else []


def make(**overrides) -> PriorityPolicy:
    return PriorityPolicy(build_config(PriorityConfig, overrides, "priority"))
