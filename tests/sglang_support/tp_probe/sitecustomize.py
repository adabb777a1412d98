"""Per-rank evidence of the SGLang plugin's TP path (test support, not product).

Put this directory on PYTHONPATH of an SGLang server and set $SGLANG_SLO_TP_PROBE_DIR: every
scheduler process (one per TP rank) then appends JSON lines to `<dir>/tp<rank>-<pid>.jsonl`
about what its `SloSchedulerState` did, so a test can check that all ranks applied the same
planner updates and built the same batches (rank 0 decides, the others follow the broadcast):

- `update`: a `PlannerUpdate` carrying a plan or an expiry was applied (plan step, expiry, rank
  0's clock it carried, the plan in force afterwards, the rank's counters). Clock-only updates
  (TP > 1 sends one every loop pass) are counted in `ticks` of the next line instead.
- `arrival`: a request's SLO anchor (`arrival_s`, the TTFT deadline), logged at the first
  planner update after the request (with TP > 1 the one that anchors it on rank 0's clock).
- `launch`: a batch was launched (forward_iter, mode, request ids, per-request extend lengths,
  the plan it was built under or the fallback, the plan's chunks left afterwards), plus
  whether this rank holds a planner link and how many reports it sent (rank-local facts,
  not compared across ranks).
- `report`: an `IterationReport` was built on this rank (only rank 0 talks to the planner).

`t` (time.monotonic, system-wide on Linux) lets a test line events up with its own actions.
The patch is applied right before `sglang_slo.sglang_plugin.hooks` is first imported (hooks
import the state module), so the dispatcher binds the wrapped `apply_update`.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

DIR_ENV = "SGLANG_SLO_TP_PROBE_DIR"
_TRIGGER = "sglang_slo.sglang_plugin.hooks"


def _writer():
    import json
    import time

    state = {"f": None, "rank": None, "ticks": 0}

    def write(ev: str, **fields) -> None:
        if state["f"] is None:
            from sglang.srt.runtime_context import get_parallel

            state["rank"] = int(get_parallel().tp_rank)
            path = os.path.join(os.environ[DIR_ENV], f"tp{state['rank']}-{os.getpid()}.jsonl")
            state["f"] = open(path, "a", buffering=1)
        line = {"ev": ev, "rank": state["rank"], "t": time.monotonic(), "ticks": state["ticks"], **fields}
        state["f"].write(json.dumps(line) + "\n")

    return write, state


def _mode(batch) -> str:
    fm = batch.forward_mode
    return "mixed" if fm.is_mixed() else "extend" if fm.is_extend() else "decode" if fm.is_decode() else str(fm)


def _patch() -> None:
    from sglang_slo.sglang_plugin import scheduler_state as ss

    cls = ss.SloSchedulerState
    write, counters = _writer()
    apply_update, on_new_request, report = cls.apply_update, cls.on_new_request, cls.report
    launch_name = "after_launch" if hasattr(cls, "after_launch") else "note_launch"
    launch = getattr(cls, launch_name)

    pending: list = []  # requests whose anchor is logged after the next update

    def probed_apply_update(self, update):
        out = apply_update(self, update)
        for req in pending:
            s = getattr(req, "slo", None)
            write("arrival", rid=req.rid, arrival_s=getattr(s, "arrival_s", None),
                  ttft_deadline_s=getattr(s, "ttft_deadline_s", None), priority=req.priority)
        pending.clear()
        if update.plan is None and not update.expire:
            counters["ticks"] += 1
            return out
        write("update", plan=update.plan.step if update.plan is not None else None, expire=bool(update.expire),
              now_s=update.now_s, in_force=self.plan.step, applied=self.plan.plans_applied,
              expired=self.plan.plans_expired)
        return out

    def probed_on_new_request(self, req):
        out = on_new_request(self, req)
        pending.append(req)
        return out

    def probed_launch(self, batch):
        out = launch(self, batch)
        plan = self.building_plan
        view = self.plan.view
        extend = list(batch.extend_lens or []) if batch.forward_mode.is_extend() else []
        write("launch", iter=batch.forward_iter, mode=_mode(batch), rids=[r.rid for r in batch.reqs], extend=extend,
              plan=plan.step if plan is not None else -1, fallback=getattr(self, "fallback", None),
              chunks_left=dict(view.prefill_tokens) if view is not None else None,
              link=self.link is not None, reports=self.reports_sent)
        return out

    def probed_report(self, batch, result):
        out = report(self, batch, result)
        write("report", iter=batch.forward_iter, link_up=bool(self.link and self.link.up))
        return out

    cls.apply_update = probed_apply_update
    cls.on_new_request = probed_on_new_request
    setattr(cls, launch_name, probed_launch)
    cls.report = probed_report


class _ProbeFinder(importlib.abc.MetaPathFinder):
    """Patches the state class once, when the plugin's hooks module is first imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname == _TRIGGER:
            sys.meta_path.remove(self)
            _patch()
        return None  # the normal finders load the module


if os.environ.get(DIR_ENV) and _TRIGGER not in sys.modules:
    sys.meta_path.insert(0, _ProbeFinder())
