"""The embedded engine core: requests in, tokens and protocol events out. No sockets.

    engine = Engine(target, draft, EngineConfig(...))
    arrived = engine.add_request("r1", prompt_ids, SamplingParams(max_new_tokens=64), slo)
    engine.apply_plan(plan)                  # whenever the planner sends one
    while engine.has_work:
        out = engine.step()                  # schedule -> run -> postprocess
        out.new_tokens, out.finished, out.events   # events: RequestFinished..., IterationReport

`step()` applies the latest plan if it is still valid (else the local EDF fallback runs and
the report says plan_step = -1). `planner_link.py` is the thin shell that ferries `events`
to the planner sidecar and plans back.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from protos import messages as protos
from sglang_slo.engine.block_tables import BlockPool, BlockTables
from sglang_slo.engine.drafter import Drafter
from sglang_slo.engine.kv_cache import KVCache
from sglang_slo.engine.model import LlamaForCausalLM
from sglang_slo.engine.request import InvalidRequestError, Request, RequestStatus, SamplingParams
from sglang_slo.engine.runner import ModelRunner, RunOutput
from sglang_slo.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig

FinishReason = protos.FinishReason


@dataclass(frozen=True)
class EngineConfig:
    """Sizes of the embedded engine (the scheduler's policy settings live in `scheduler`)."""

    kv_capacity_tokens: int = 65536
    """Target KV cache slots (tokens); the draft cache gets as many."""
    block_size: int = 16
    """Tokens per KV block."""
    max_context: int = 0
    """Longest prompt + output (tokens); 0 = the target's max_position_embeddings."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Batch limits and the local fallback policy."""
    device: str = "cpu"
    """Where the KV caches live and the batch tensors are made ('cpu' or 'cuda'); the models
    must already be there (`load_model(..., device=)`)."""
    dtype: str = "float32"
    """KV cache dtype (torch dtype name), normally the models' dtype."""
    slo_order: str = "fewest_tokens"
    """Order of AdaServe's SLO step (see spec.select.select_trees)."""

    def __post_init__(self):
        if self.kv_capacity_tokens < self.block_size or self.block_size < 1:
            raise ValueError("need block_size >= 1 and kv_capacity_tokens >= block_size")


@dataclass
class FinishedRequest:
    rid: str
    reason: FinishReason
    output_ids: list[int]
    message: str = ""


@dataclass
class StepOutput:
    """What one `step()` produced."""

    new_tokens: dict[str, list[int]] = field(default_factory=dict)
    """Output tokens committed this step, by request id."""
    finished: list[FinishedRequest] = field(default_factory=list)
    events: list[protos.Message] = field(default_factory=list)
    """Protocol messages for the planner, in order: RequestFinished of aborts since the last
    step, the IterationReport, then RequestFinished of requests that ended in this step."""
    report: protos.IterationReport | None = None


class Engine:
    """Pure in-process engine core (see the module docstring)."""

    def __init__(self, target: LlamaForCausalLM, draft: LlamaForCausalLM | None = None,
                 config: EngineConfig | None = None, clock: Callable[[], float] = time.monotonic):
        self.config = config = config or EngineConfig()
        self.clock = clock
        cfg = target.config
        if draft is not None and draft.config.vocab_size != cfg.vocab_size:
            raise ValueError(f"draft vocab {draft.config.vocab_size} != target vocab {cfg.vocab_size}")
        for name, m in (("target", target), ("draft", draft)):
            where = next(m.parameters()).device if m is not None else None
            if where is not None and where.type != torch.device(config.device).type:
                raise ValueError(f"{name} model is on {where}, the engine's device is {config.device}")
        self.vocab_size = cfg.vocab_size
        self.eos_ids = frozenset(cfg.eos_token_ids)
        limit = cfg.max_position_embeddings if draft is None else min(cfg.max_position_embeddings,
                                                                       draft.config.max_position_embeddings)
        self.max_context = min(config.max_context or limit, limit)
        dtype = getattr(torch, config.dtype)
        num_blocks = config.kv_capacity_tokens // config.block_size + 1  # + the null block
        self.kv = KVCache.for_model(cfg, num_blocks, config.block_size, dtype, config.device)
        draft_kv = None
        if draft is not None:
            draft_kv = KVCache.for_model(draft.config, num_blocks, config.block_size, dtype, config.device)
        self.tables = BlockTables(BlockPool.create(num_blocks, config.block_size),
                                  BlockPool.create(num_blocks, config.block_size) if draft is not None else None,
                                  reserve_null_block=True)
        sched_cfg = config.scheduler
        if draft is None and sched_cfg.max_depth:
            sched_cfg = replace(sched_cfg, max_depth=0, fallback_depth=0, fallback_tree_cap=1)
        self.scheduler = Scheduler(sched_cfg, self.tables, self.max_context)
        drafter = Drafter(draft, draft_kv, self.tables, config.device) if draft is not None else None
        self.runner = ModelRunner(target, self.kv, self.tables, drafter, config.device, config.slo_order)
        self.requests: dict[str, Request] = {}
        self.step_index = 0
        self._plan: protos.Plan | None = None
        self._pending: list[protos.Message] = []  # events produced between steps (aborts)
        self._outputs: dict[str, list[int]] = {}  # finished rid -> output ids, until reported
        self._config_hash = hashlib.sha1(repr((cfg, draft.config if draft else None, config)).encode()).hexdigest()[:12]

    # ---- requests ------------------------------------------------------------------------

    def add_request(self, rid: str, prompt_ids: list[int], params: SamplingParams, slo: protos.Slo,
                    session_id: str = "") -> protos.RequestArrived:
        """Queue a request; raises `InvalidRequestError` (state unchanged) on bad input."""
        if not rid or rid in self.requests:
            raise InvalidRequestError(f"request id {rid!r} is empty or already in use")
        params.validate()
        prompt = list(prompt_ids)
        if not prompt:
            raise InvalidRequestError("empty prompt")
        if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in prompt):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        if len(prompt) >= self.max_context:
            raise InvalidRequestError(
                f"prompt of {len(prompt)} tokens leaves no room to generate within the context length "
                f"{self.max_context}")
        if len(prompt) + 1 > self.tables.capacity_tokens:
            raise InvalidRequestError(f"prompt of {len(prompt)} tokens does not fit the KV cache")
        if not (slo.ttft_s >= 0 and slo.tpot_s >= 0):
            raise InvalidRequestError("SLO ttft_s and tpot_s must be >= 0")
        req = Request(rid, prompt, params, slo, arrival_s=self.clock(), session_id=session_id)
        self.requests[rid] = req
        self.scheduler.add(req)
        return req.arrived_message()

    def abort(self, rid: str, message: str = "aborted") -> protos.RequestFinished | None:
        """Stop `rid` now and free its KV; None if it is unknown or already finished."""
        req = self.requests.get(rid)
        if req is None:
            return None
        fin = self._finish(req, FinishReason.ABORT, message)
        self._pending.append(fin)
        return fin

    def apply_plan(self, plan: protos.Plan) -> None:
        """Keep the newest plan; `step()` uses it while it is valid."""
        if self._plan is None or plan.step >= self._plan.step:
            self._plan = plan

    @property
    def plan(self) -> protos.Plan | None:
        """The newest plan received (valid or not)."""
        return self._plan

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ---- the loop ------------------------------------------------------------------------

    def step(self) -> StepOutput:
        """One iteration: schedule -> run -> postprocess."""
        start = self.clock()
        batch = self.scheduler.schedule(self._plan, start)
        run = self.runner.run(batch) if not batch.is_empty else RunOutput()
        return self._postprocess(batch, run, start)

    def _postprocess(self, batch: ScheduledBatch, run: RunOutput, start: float) -> StepOutput:
        """Commit tokens, finish requests, build the report.

        Event order: aborts since the last step, the IterationReport (whose progress still
        names the requests finishing now), then this step's RequestFinished events.
        """
        out = StepOutput()
        now = self.clock()
        finished = [self._finish(req, FinishReason.REJECTED, "rejected by admission control", now)
                    for req in batch.rejected]
        finished += [self._finish(req, FinishReason.ERROR, why, now) for req, why in batch.failed]
        progress = []
        for rid, res in run.results.items():
            req = self.requests.get(rid)
            if req is None:
                continue
            if res.error:
                self._scrub_kv(req)
                finished.append(self._finish(req, FinishReason.ERROR, res.error, now))
                continue
            tokens = self._append(req, res.new_tokens, now)
            if tokens:
                out.new_tokens[rid] = tokens
            progress.append(protos.RequestProgress(
                rid=rid, prefilled=req.num_prefilled_prompt, decoded=req.num_output_tokens,
                prefill_tokens=res.prefill_tokens, verified=res.verified, accepted=res.accepted,
                depth=res.depth, draft_conf=res.draft_conf, first_token_s=req.first_token_s))
            reason = self._stop_reason(req)
            if reason is not None:
                finished.append(self._finish(req, reason, "", now))
        out.report = protos.IterationReport(
            step=self.step_index, start_s=start, end_s=self.clock(), plan_step=batch.plan_step,
            prefill_tokens=run.prefill_tokens, verify_tokens=run.verify_tokens,
            draft_steps=run.draft_steps, context_tokens=run.context_tokens,
            kv_free_tokens=self.tables.free_tokens, progress=progress,
            waiting=len(self.scheduler.waiting), forward_s=run.model_s)
        out.events = [*self._pending, out.report, *finished]
        out.finished = [FinishedRequest(e.rid, e.reason, self._outputs.pop(e.rid, []), e.message)
                        for e in out.events if isinstance(e, protos.RequestFinished)]
        self._pending = []
        self.step_index += 1
        return out

    def _append(self, req: Request, tokens: list[int], now: float) -> list[int]:
        """Append committed tokens up to the first stop condition; returns those kept."""
        kept = []
        for t in tokens:
            if self._stop_reason(req) is not None:
                break
            req.output_ids.append(t)
            kept.append(t)
        if kept and not req.first_token_s:
            req.first_token_s = now
        return kept

    def _stop_reason(self, req: Request) -> FinishReason | None:
        if not req.output_ids:
            return None
        last = req.output_ids[-1]
        if last in req.params.stop_token_ids or (not req.params.ignore_eos and last in self.eos_ids):
            return FinishReason.STOP
        if req.num_output_tokens >= req.params.max_new_tokens or req.num_tokens >= self.max_context:
            return FinishReason.LENGTH
        return None

    def _finish(self, req: Request, reason: FinishReason, message: str, now: float | None = None
                ) -> protos.RequestFinished:
        self.scheduler.remove(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason, req.finish_message = reason, message
        del self.requests[req.rid]
        self._outputs[req.rid] = req.output_ids
        return protos.RequestFinished(rid=req.rid, reason=reason, decoded=req.num_output_tokens,
                                      finish_s=self.clock() if now is None else now, message=message)

    def _scrub_kv(self, req: Request) -> None:
        """Zero a failed request's KV blocks so non-finite values never reach later users."""
        for kv, blocks in ((self.kv, self.tables.table(req.rid)),
                           (self.runner.drafter.kv if self.runner.drafter else None, self.tables.table(req.rid, True))):
            if kv is not None and blocks:
                idx = torch.tensor(blocks, dtype=torch.long, device=kv.k.device)
                kv.k[:, idx] = 0
                kv.v[:, idx] = 0

    # ---- protocol ------------------------------------------------------------------------

    def hello(self) -> protos.EngineHello:
        c = self.scheduler.config
        spec = self.runner.drafter is not None
        return protos.EngineHello(
            protocol_version=protos.PROTOCOL_VERSION, engine="embedded",
            spec_modes=[protos.SpecMode.NONE] + ([protos.SpecMode.CHAIN, protos.SpecMode.TREE] if spec else []),
            max_batch_tokens=c.max_batch_tokens, kv_capacity_tokens=self.tables.capacity_tokens,
            max_depth=c.max_depth if spec else 0, max_width=c.max_width if spec else 1,
            kv_block_tokens=self.config.block_size, config_hash=self._config_hash, clock_s=self.clock())

    def resync(self) -> protos.Resync:
        """Complete in-flight state for a (new) planner."""
        return protos.Resync(now_s=self.clock(), step=self.step_index,
                             requests=[r.snapshot() for r in self.requests.values()],
                             kv_free_tokens=self.tables.free_tokens)

    def check_kv(self) -> None:
        """Raise AssertionError if KV blocks leaked (blocks held by no live request)."""
        held_t = sum(len(self.tables.table(rid)) for rid in self.requests) + self.tables.num_reserved
        self.tables.target.allocator.check_consistent(expected_used=held_t)
        if self.tables.draft is not None:
            held_d = sum(len(self.tables.table(rid, True)) for rid in self.requests) + self.tables.num_reserved
            self.tables.draft.allocator.check_consistent(expected_used=held_d)
