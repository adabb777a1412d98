"""The comparison's batch evidence: SGLang's own prefill log lines and the plugin's plan log."""

from __future__ import annotations

from tests.sglang_support.batch_stats import plan_effects, prefill_batches

# verbatim format of SGLang 0.5.23's scheduler log (metrics_reporter.report_prefill_stats)
LINES = [
    "[2026-11-22 13:06:48] Prefill batch, #new-seq: 1, #new-token: 32, #cached-token: 0, token usage: 0.00, "
    "#running-req: 3, #queue-req: 2, #pending-token: 0, cpu graph: False, input throughput (token/s): 28.62",
    "[2026-11-22 13:06:48] Decode batch, #running-req: 4, #token: 73, token usage: 0.00, cpu graph: False, "
    "gen throughput (token/s): 31.41, #queue-req: 0",
    "[2026-11-22 13:06:49] Prefill batch, #new-seq: 2, #new-token: 100, #cached-token: 5, token usage: 0.01, "
    "#running-req: 4, #queue-req: 0, #pending-token: 0, cpu graph: False, input throughput (token/s): 133.26",
]


def test_prefill_batches_count_size_and_decoder_waits():
    got = prefill_batches(LINES)
    assert (got["prefill_batches"], got["prefill_seqs"], got["prefill_tokens_per_batch"]) == (2, 3, 66.0)
    assert got["decoder_waits"] == 3 + 4 and got["queue_len_mean_at_prefill"] == 1.0
    assert prefill_batches(LINES, mixed=True)["decoder_waits"] == 0  # decoders ran inside those forwards
    assert prefill_batches([])["prefill_tokens_per_batch"] is None


def _it(mode, prefill, plan_prefill, waiting=0, plan_step=1, arrival_tokens=None):
    return {"mode": mode, "prefill": prefill, "plan_prefill": plan_prefill, "waiting": waiting, "plan_step": plan_step,
            "plan_arrival_tokens": arrival_tokens}


def test_plan_effects_flag_chunking_deferral_and_plan_violations():
    its = [
        _it("prefill", {"a": 64}, {"a": 64}),
        _it("decode", {}, {}, waiting=2),  # the plan chose decode while requests waited
        _it("mixed", {"a": 36, "b": 10}, {"b": 8}),  # a: continuing chunk outside the plan; b: over its chunk
        _it("decode", {}, None, waiting=3, plan_step=-1),  # fallback: not the plan's doing
        _it("prefill", {"c": 20}, {}, arrival_tokens=64),  # c arrived after the plan: its allowance
    ]
    got = plan_effects(its)
    assert (got["iterations"], got["under_plan"], got["prefill_iterations"], got["mixed_iterations"]) == (5, 4, 3, 1)
    assert got["decode_while_waiting_by_plan"] == 1
    assert (got["prompts_prefilled"], got["prompts_in_several_chunks"]) == (3, 1)
    assert (got["prefills_outside_plan"], got["chunks_over_plan"]) == (1, 1)
    assert (got["arrival_prefills"], got["plans_with_arrival_allowance"]) == (1, 1)
