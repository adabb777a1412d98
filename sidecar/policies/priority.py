"""`priority`: SGLang priority scheduling: fcfs mechanics, ordered by `Slo.priority`.

Waiting and running requests are served by priority (larger first), then arrival. When the
most important waiting request does not fit in KV, running requests of strictly lower
priority are preempted (lowest priority, latest arrival first), as SGLang's
`--enable-priority-scheduling` with preemption does.
"""

from __future__ import annotations

from sidecar.policies.base import build_config
from sidecar.policies.fcfs import FcfsConfig, FcfsPolicy
from sidecar.state import PlannerState, ReqState


class PriorityPolicy(FcfsPolicy):
    name = "priority"

    def order(self, reqs: list[ReqState]) -> list[ReqState]:
        return sorted(reqs, key=lambda r: (-r.slo.priority, r.seq))

    def preemptions(self, state: PlannerState, running: list[ReqState], waiting: list[ReqState], kv_left: int) -> list[ReqState]:
        ratio = self.config.new_token_ratio
        # Only requests that could start this iteration justify preempting (one chunk's worth).
        prefill_room = self.config.chunk_size
        victims: list[ReqState] = []
        pool = sorted(running, key=lambda r: (r.slo.priority, -r.seq))  # cheapest victims first
        for w in waiting:
            if prefill_room <= 0 or w.prompt_tokens >= state.limits.kv_capacity_tokens:
                break
            need = w.prompt_tokens - w.prefilled + int(min(w.remaining_decode, 4096) * ratio)
            if need > kv_left:
                chosen, freed = [], 0
                for v in pool:
                    if v.slo.priority >= w.slo.priority or need <= kv_left + freed:
                        break
                    chosen.append(v)
                    freed += v.kv_tokens + v.remaining_prefill + int(min(v.remaining_decode, 4096) * ratio)
                if need > kv_left + freed:
                    break  # cannot make room for the head: stop (head-of-line, like fcfs)
                victims.extend(chosen)
                del pool[: len(chosen)]
                kv_left += freed
            kv_left -= need
            prefill_room -= w.prompt_tokens - w.prefilled
        return victims


def make(**overrides) -> PriorityPolicy:
    return PriorityPolicy(build_config(FcfsConfig, overrides, "priority"))
