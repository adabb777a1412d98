"""Factories for SGLang plugin tests: real SGLang objects (Req, PrefillAdder, radix cache,
KV allocator, Scheduler shells) in-process, without a server. Test support, not product.

`publish_config(model_dir)` must run once per process before PrefillAdder admissions: SGLang
reads its process-wide config bags there.
"""

from __future__ import annotations

import itertools
from array import array

from protos.messages import AdmissionDecision, Decision, DecodeEntry, Plan, PrefillChunk

_published = False
_rids = itertools.count()


def publish_config(model_dir: str) -> None:
    """Publish a CPU ServerArgs as this process's SGLang config (idempotent)."""
    global _published
    if _published:
        return
    from sglang.srt.runtime_context import get_parallel, publish
    from sglang.srt.server_args import ServerArgs

    publish(ServerArgs(model_path=str(model_dir), device="cpu"), role="scheduler")
    try:  # a single-rank scheduler process: rank 0 of every group
        get_parallel().override_permanently(tp_rank=0, pp_rank=0, attn_tp_rank=0, attn_cp_rank=0)
    except ValueError:
        get_parallel().override_permanently(tp_rank=0)
    _published = True


def make_req(prompt_tokens: int, rid: str | None = None, max_new_tokens: int = 16, slo: dict | None = None,
             priority: int | None = None):
    """A real SGLang `Req` with a `prompt_tokens`-long prompt and optional `custom_params.slo`."""
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    custom = {"slo": slo} if slo is not None else None
    sp = SamplingParams(max_new_tokens=max_new_tokens, custom_params=custom)
    rid = rid or f"r{next(_rids)}"
    return Req(rid, "", array("q", range(1, prompt_tokens + 1)), sp, priority=priority, vocab_size=512)


def kv_and_cache(size: int = 4096):
    """A real token KV allocator (`size` slots) and a simulated radix cache on top of it."""
    import torch
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.radix_cache import RadixCache

    alloc = TokenToKVPoolAllocator(size, torch.float32, "cpu", None, False)
    return alloc, RadixCache.create_simulated(mock_allocator=alloc)


def adder_args(alloc, cache, max_prefill_tokens: int = 1000, chunk: int | None = 256) -> tuple:
    """Positional arguments SGLang's scheduler passes to the prefill adder (page size 1)."""
    from sglang.srt.managers.schedule_batch import ScheduleBatch

    return (1, cache, alloc, ScheduleBatch(reqs=[]), 0.5, max_prefill_tokens, chunk)


def run_prefill_pass(adder, queue, cache) -> list:
    """SGLang's admission loop (scheduler._get_new_batch_prefill_raw), minus batch building."""
    from sglang.srt.managers.schedule_policy import AddReqResult

    for req in queue:
        if adder.budget_state() == AddReqResult.OTHER:
            break
        req.init_next_round_input(cache)
        if adder.add_one_req(req, has_chunked_req=False, truncation_align_size=None) != AddReqResult.CONTINUE:
            break
    return adder.can_run_list


def make_plan(step: int = 1, budget: int = 1024, prefill: dict[str, int] | None = None, decode: list[str] = (),
              decisions: dict[str, Decision] | None = None, spec_depth: int = -1, valid_until_s: float = 1e18,
              arrival_tokens: int = 0) -> Plan:
    return Plan(
        step=step,
        valid_until_s=valid_until_s,
        token_budget=budget,
        prefill=[PrefillChunk(rid=r, tokens=t) for r, t in (prefill or {}).items()],
        decode=[DecodeEntry(rid=r) for r in decode],
        decisions=[AdmissionDecision(rid=r, decision=d) for r, d in (decisions or {}).items()],
        spec_depth=spec_depth,
        arrival_tokens=arrival_tokens,
    )


def scheduler_shell(enable_priority_scheduling: bool = False):
    """`object.__new__(Scheduler)` with the attributes the plugin's hooks read."""
    from sglang.srt.managers.scheduler import Scheduler
    from sglang.utils import TypeBasedDispatcher

    sched = object.__new__(Scheduler)
    sched.enable_priority_scheduling = enable_priority_scheduling
    sched.schedule_low_priority_values_first = False
    sched.waiting_queue = []
    sched.running_batch = None
    sched.last_batch = None
    sched.chunked_req = None
    sched._request_dispatcher = TypeBasedDispatcher([])
    sched._prefill_decode_interval_remaining = 0
    sched.prefill_decode_interval_min_bs = 0
    sched.chunked_prefill_size = 256
    sched.max_total_num_tokens = 4096
    sched.page_size = 1
    return sched
