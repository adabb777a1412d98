"""What SGLang's batches looked like during a run, from its own log and the plugin's report log.

`prefill_batches(server_log_lines)`: SGLang's "Prefill batch" log lines (one per prefill or
mixed forward, default scheduler and plugin alike): how many, their size, and how many running
decoders each one made wait (without mixed chunks a prefill forward runs no decode step).

`plan_effects(iteration_lines)`: the plugin's per-iteration JSON lines (SGLANG_SLO_REPORT_LOG):
how many iterations ran under a plan (and why the others fell back to SGLang: no plan yet,
the plan expired, or the plan had nothing left while the engine would idle), how many decoded
while requests waited because the plan chose decode, how many prompts the plan split into several chunks, and whether every prefill
stayed inside its plan (admitted set and chunk sizes), and how many prompts prefilled as
arrivals the plan did not know, under its arrival allowance (`Plan.arrival_tokens`).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

_PREFILL = re.compile(r"Prefill batch.*?#new-seq: (\d+), #new-token: (\d+),.*?#running-req: (\d+), #queue-req: (\d+)")


def prefill_batches(lines: Iterable[str], mixed: bool = False) -> dict:
    """Counts over SGLang's prefill log lines; `mixed`: decoders ran inside them (--enable-mixed-chunk)."""
    n = seqs = tokens = waits = queued = 0
    for line in lines:
        m = _PREFILL.search(line)
        if m is None:
            continue
        s, t, running, queue = (int(g) for g in m.groups())
        n, seqs, tokens, queued = n + 1, seqs + s, tokens + t, queued + queue
        waits += 0 if mixed else running
    return {
        "prefill_batches": n,
        "prefill_seqs": seqs,
        "prefill_tokens_per_batch": round(tokens / n, 1) if n else None,
        "decoder_waits": waits,
        "queue_len_mean_at_prefill": round(queued / n, 2) if n else None,
    }


def plan_effects(iterations: Iterable[dict]) -> dict:
    """Plan evidence from the plugin's iteration log lines (dicts)."""
    its = list(iterations)
    planned = [it for it in its if it["plan_step"] >= 0]
    chunks = Counter(rid for it in its for rid in it["prefill"])
    outside = over = arrivals = 0
    for it in planned:
        plan = it.get("plan_prefill") or {}
        for rid, tok in it["prefill"].items():
            if rid not in plan:
                if it.get("plan_arrival_tokens"):
                    arrivals += 1  # an arrival the plan did not know, under its arrival allowance
                else:
                    outside += 1  # a continuing chunk the plan did not list (SGLang must finish it)
            elif tok > plan[rid]:
                over += 1
    return {
        "iterations": len(its),
        "under_plan": len(planned),
        "fallback_fraction": round(1 - len(planned) / len(its), 3) if its else None,
        "fallback_by_reason": dict(Counter(it.get("fallback") or "?" for it in its if it["plan_step"] < 0)),
        "prefill_iterations": sum(it["mode"] != "decode" for it in its),
        "mixed_iterations": sum(it["mode"] == "mixed" for it in its),
        "decode_while_waiting_by_plan": sum(it["mode"] == "decode" and it["waiting"] > 0 for it in planned),
        "prompts_prefilled": len(chunks),
        "prompts_in_several_chunks": sum(c > 1 for c in chunks.values()),
        "prefills_outside_plan": outside,
        "arrival_prefills": arrivals,
        "plans_with_arrival_allowance": sum(bool(it.get("plan_arrival_tokens")) for it in planned),
        "chunks_over_plan": over,
    }
