"""Per-iteration feedback: one SGLang batch result -> `protos.IterationReport`.

Reads only what `Scheduler.process_batch_result` leaves on the batch (which survives the
overlap scheduler's `ScheduleBatch.copy()`: reqs, forward_mode, extend/prefix lens,
forward_iter, launch_ts) and on the result (`num_correct_drafts_per_req_cpu`).
"""

from __future__ import annotations

from protos.messages import FinishReason, IterationReport, RequestProgress

from sglang_slo.sglang_plugin.request_slo import req_slo


def finish_reason_of(req) -> FinishReason:
    """Map SGLang's finish-reason class to the protocol's enum."""
    name = type(req.finished_reason).__name__
    if name == "FINISH_LENGTH":
        return FinishReason.LENGTH
    if name == "FINISH_ABORT":
        return FinishReason.ABORT
    return FinishReason.STOP


def note_first_tokens(reqs, now_s: float) -> None:
    """Stamp `req.slo.first_token_s` on requests that just committed their first output token."""
    for req in reqs:
        s = req_slo(req)
        if s is not None and s.first_token_s == 0.0 and len(req.output_ids) > 0:
            s.first_token_s = now_s


def decoders_in_mixed(batch) -> set[int]:
    """ids of the running requests SGLang mixed into this prefill forward (empty otherwise)."""
    if not batch.forward_mode.is_mixed():
        return set()
    return {id(r) for r in (batch.decoding_reqs or [])}


def build_report(
    batch,
    result,
    *,
    step: int,
    plan_step: int,
    end_s: float,
    kv_free_tokens: int,
    waiting: int,
    spec_depth: int = 0,
) -> IterationReport:
    """Summarise one forward. `spec_depth`: draft steps this decode ran (0 = none)."""
    extend = batch.forward_mode.is_extend()  # prefill or mixed (--enable-mixed-chunk)
    extend_lens = list(batch.extend_lens or []) if extend else []
    prefix_lens = list(batch.prefix_lens or []) if extend else []
    riders = decoders_in_mixed(batch)  # decode rows of a mixed forward: one token each, no prompt
    accepted = getattr(result, "num_correct_drafts_per_req_cpu", None) or []
    depth = 0 if extend else max(spec_depth, 0)
    progress = []
    for i, req in enumerate(batch.reqs):
        s = req_slo(req)
        chunk = extend_lens[i] if i < len(extend_lens) and id(req) not in riders else 0  # prompt tokens
        prefilled = prefix_lens[i] + chunk if i < len(prefix_lens) else len(req.origin_input_ids)
        progress.append(
            RequestProgress(
                rid=req.rid,
                prefilled=min(prefilled, len(req.origin_input_ids)),
                decoded=len(req.output_ids),
                prefill_tokens=chunk,
                verified=depth,
                accepted=int(accepted[i]) if i < len(accepted) else 0,
                depth=depth,
                first_token_s=s.first_token_s if s is not None else 0.0,
            )
        )
    n = len(batch.reqs)
    return IterationReport(
        step=step,
        start_s=float(batch.launch_ts or end_s),
        end_s=end_s,
        plan_step=plan_step,
        prefill_tokens=sum(p.prefill_tokens for p in progress),
        verify_tokens=len(riders) if extend else n * (depth + 1),
        draft_steps=depth,
        context_tokens=sum(req.seqlen for req in batch.reqs),
        kv_free_tokens=kv_free_tokens,
        progress=progress,
        waiting=waiting,
    )
