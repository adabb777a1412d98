"""`SloPrefillAdder`: SGLang's `PrefillAdder` driven by the planner's plan.

Returned by the `Scheduler.get_prefill_adder_class` hook (SGLang's designed override point).
With a plan, one prefill pass admits exactly the plan's prefill list, each request with at
most its planned number of prompt tokens, within the plan's token budget, plus whole prompts
of arrivals the plan does not know, within its `arrival_tokens`; without one it is SGLang's
adder unchanged. All KV/memory accounting stays SGLang's: the subclass only
narrows the budgets SGLang already checks (`rem_input_tokens`, `rem_chunk_tokens`,
`prefill_max_requests`) and says OTHER ("stop admitting") for requests outside the plan.

SGLang keeps at most one partially prefilled request (`Scheduler.chunked_req`), so a pass
that already carries an unfinished chunk, or has cut one, admits only whole prompts.
"""

from __future__ import annotations

import functools
import inspect

from sglang.srt.managers.schedule_policy import AddReqResult, PrefillAdder

from sglang_slo.sglang_plugin.plan_state import PlanView

_ARGS = inspect.signature(PrefillAdder.__init__)  # to find num_mixed_decode_tokens however it is passed
_ARRIVALS_PER_PREFILL = 64  # most unplanned arrivals one prefill takes under an arrival allowance


class SloPrefillAdder(PrefillAdder):
    """A `PrefillAdder` whose admission set, chunk sizes and token budget come from a plan."""

    def __init__(self, *args, plan: PlanView | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.plan = plan
        self.unfinished_chunk = False  # the continuing chunked request stays partial
        if plan is None:
            return
        # The plan's budget counts the decode tokens of the iteration too; in a mixed forward
        # (--enable-mixed-chunk) those ride in this batch, so the prefill gets the rest.
        riders = _ARGS.bind(self, *args, **kwargs).arguments.get("num_mixed_decode_tokens", 0) or 0
        # Arrivals the plan does not know may add up to plan.arrival_tokens prompt tokens.
        self.arrival_left = plan.arrival_tokens  # tokens
        budget = max(plan.token_budget - riders, 0) + self.arrival_left  # tokens
        self.rem_input_tokens = min(self.rem_input_tokens, budget)
        if self.rem_chunk_tokens is not None:
            self.rem_chunk_tokens = min(self.rem_chunk_tokens, budget)
        cap = len(plan.prefill_tokens) + (self.arrival_left > 0) * _ARRIVALS_PER_PREFILL
        self.prefill_max_requests = cap if self.prefill_max_requests is None else min(self.prefill_max_requests, cap)

    @classmethod
    def bind(cls, plan: PlanView | None):
        """The factory SGLang calls in place of the class (it passes the stock arguments)."""
        return functools.partial(cls, plan=plan)

    def add_chunked_req(self, req):
        """Continue the in-flight chunked request, at most the plan's tokens for it."""
        if self.plan is not None:
            planned = self.plan.prefill_tokens.get(req.rid)
            if planned is None:
                # It must make progress (it holds KV); it just doesn't use a plan slot.
                if self.prefill_max_requests is not None:
                    self.prefill_max_requests += 1
            else:
                limit = self.chunked_req_limit
                self.chunked_req_limit = planned if limit is None else min(limit, planned)
        still_partial = super().add_chunked_req(req)
        self.unfinished_chunk = still_partial is not None
        return still_partial

    def add_one_req(self, req, has_chunked_req: bool, truncation_align_size):
        if self.plan is None:
            return super().add_one_req(req, has_chunked_req, truncation_align_size)
        planned = self.plan.prefill_tokens.get(req.rid)
        if planned is None:
            if self.plan.admits_arrival(req.rid):
                return self._add_arrival(req, has_chunked_req, truncation_align_size)
            return AddReqResult.OTHER  # the queue is in plan order: the admitted set is used up
        if self.rem_chunk_tokens is None:  # chunked prefill is off: the plan only admits
            return super().add_one_req(req, has_chunked_req, truncation_align_size)
        remaining = len(req.full_untruncated_fill_ids) - req.prefix_len  # prompt tokens left
        cap = min(planned, self.rem_chunk_tokens)
        if (self.unfinished_chunk or self.new_chunked_req is not None) and cap < remaining:
            return AddReqResult.OTHER  # it would be cut: SGLang holds one partial chunk at most
        return self._add_with_chunk_cap(req, cap, has_chunked_req, truncation_align_size)

    def _add_arrival(self, req, has_chunked_req: bool, truncation_align_size):
        """An arrival the plan does not know (it sorts after every planned request): its whole
        prompt, SGLang's way, if it fits what is left of the plan's arrival allowance. Never a
        chunk: a prompt split over several prefill forwards would stall the decoders again."""
        remaining = len(req.full_untruncated_fill_ids) - req.prefix_len  # prompt tokens left
        if (remaining > self.arrival_left or self.unfinished_chunk or self.new_chunked_req is not None
                or (self.rem_chunk_tokens is not None and remaining > self.rem_chunk_tokens)):
            return AddReqResult.OTHER
        before = len(self.can_run_list)
        if self.rem_chunk_tokens is None:
            res = super().add_one_req(req, has_chunked_req, truncation_align_size)
        else:
            res = self._add_with_chunk_cap(req, remaining, has_chunked_req, truncation_align_size)
        if len(self.can_run_list) > before:
            self.arrival_left -= remaining
        return res

    def _add_with_chunk_cap(self, req, cap: int, has_chunked_req: bool, truncation_align_size):
        """Run SGLang's admission with the chunk budget narrowed to `cap` tokens for this request."""
        saved = self.rem_chunk_tokens
        self.rem_chunk_tokens = cap
        before = len(self.can_run_list)
        res = super().add_one_req(req, has_chunked_req, truncation_align_size)
        charged = cap - self.rem_chunk_tokens  # tokens SGLang billed to the chunk budget
        self.rem_chunk_tokens = saved - charged
        if len(self.can_run_list) > before:
            return self.budget_state()  # admitted: go on with the restored budgets
        return res
