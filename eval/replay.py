"""Replay an `eval.workloads` trace against a real OpenAI-compatible server.

    res = replay_sync(workload, ClientConfig(base_url=url), PromptTexts(tokenizer),
                      ReplayConfig(max_duration_s=120))
    eval.metrics.summarize(res.records, res.window_s)   # same metrics as the simulator

Open-loop requests are sent at their trace arrival times (seconds from the start of the
replay). A closed-loop request (a tool-calling agent's next call, `after_rid`) is sent only
after its predecessor finished plus its tool delay; its prompt is the predecessor's prompt +
generated text + a fresh "tool result", so it shares the predecessor's prefix. If the
predecessor failed, the rest of the loop is CANCELLED (like the simulator).

Bounded: the replay stops by itself after `max_duration_s` (calls still streaming are
disconnected and, like calls not yet sent, recorded UNFINISHED) and sends at most
`max_requests` requests (the trace is cut in arrival order, a loop's later calls with it).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from eval.load_client import CallResult, ClientConfig, send_request
from eval.metrics import Outcome, RequestRecord
from eval.prompt_text import PromptTexts
from eval.workloads import GenRequest, Workload

SYSTEM_PROMPT_KEY = "shared-system-prompt"  # every agent loop's first call starts with this text


@dataclass(frozen=True)
class ReplayConfig:
    """Bounds of one replay."""

    max_duration_s: float = 300.0
    """Hard stop, seconds from the start; what is still running is UNFINISHED."""
    max_requests: int = 0
    """Send at most this many requests of the trace (0 = all)."""
    max_connections: int = 512
    """HTTP connection pool size (concurrent streams)."""
    warm_connections: int = 32
    """Keep-alive connections opened before the clock starts (GET /health), at most one per request."""

    def __post_init__(self) -> None:
        if self.max_duration_s <= 0 or self.max_requests < 0 or self.max_connections < 1 or self.warm_connections < 0:
            raise ValueError("max_duration_s > 0, max_requests >= 0, max_connections >= 1 and "
                             "warm_connections >= 0 required")


@dataclass
class ReplayResult:
    calls: list[CallResult]
    """One per trace request kept (trace order), sent or not."""
    elapsed_s: float
    """Seconds from the start to the last response (or the deadline)."""
    window_s: float
    """The trace's arrival window, seconds (goodput denominator, as for the simulator)."""
    stopped_by_deadline: bool
    stats: dict = field(default_factory=dict)
    started_at: float = 0.0
    """time.monotonic() at the replay clock's zero (to align with server-side timestamps)."""

    @property
    def records(self) -> list[RequestRecord]:
        return [c.record for c in self.calls]


def cut_trace(requests: list[GenRequest], max_requests: int) -> list[GenRequest]:
    """The first `max_requests` requests in arrival order (0 = all), with a loop's calls kept
    only if every earlier call of the loop is kept."""
    if max_requests <= 0 or max_requests >= len(requests):
        return list(requests)
    order = sorted(range(len(requests)), key=lambda i: (requests[i].arrival_s, i))[:max_requests]
    keep_idx = set(order)
    kept: set[str] = set()
    out = []
    for i, g in enumerate(requests):
        if i in keep_idx and (not g.after_rid or g.after_rid in kept):
            kept.add(g.rid)
            out.append(g)
    return out


class _Replay:
    def __init__(self, workload: Workload, client: ClientConfig, prompts: PromptTexts, cfg: ReplayConfig):
        self.client, self.prompts, self.cfg = client, prompts, cfg
        self.requests = cut_trace(workload.requests, cfg.max_requests)
        self.window_s = workload.duration_s
        self.calls: dict[str, CallResult] = {}
        self.children: dict[str, list[GenRequest]] = {}
        rids = {g.rid for g in self.requests}
        for g in self.requests:
            if g.after_rid:
                if g.after_rid not in rids:
                    raise ValueError(f"{g.rid}: depends on {g.after_rid!r}, which is not in the trace before it")
                self.children.setdefault(g.after_rid, []).append(g)
        self.tasks: set[asyncio.Task] = set()
        self.t0 = 0.0
        self.last_response_s = 0.0

    def clock(self) -> float:
        return time.monotonic() - self.t0

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run(self) -> ReplayResult:
        limits = httpx.Limits(max_connections=self.cfg.max_connections,
                              max_keepalive_connections=max(64, self.cfg.warm_connections))
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(self.client.request_timeout_s)) as http:
            self.http = http
            first = [(g, self._first_prompt(g)) for g in self.requests if not g.after_rid]  # before the clock starts
            await self._warm_connections(min(self.cfg.warm_connections, len(first)))
            self.t0 = time.monotonic()
            for g, prompt in first:
                self._spawn(self._call(g, g.arrival_s, prompt))
            deadline = self.t0 + self.cfg.max_duration_s
            stopped = False
            while self.tasks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    stopped = True
                    break
                await asyncio.wait(set(self.tasks), timeout=remaining)
            pending = list(self.tasks)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        elapsed = self.clock() if stopped else self.last_response_s
        calls = []
        for g in self.requests:  # never sent: UNFINISHED (deadline) unless CANCELLED
            c = self.calls.get(g.rid) or CallResult.new(g, arrival_s=g.arrival_s)
            calls.append(c)
        return ReplayResult(calls=calls, elapsed_s=elapsed, window_s=self.window_s,
                            stopped_by_deadline=stopped, stats=_stats(calls), started_at=self.t0)

    async def _warm_connections(self, n: int) -> None:
        """Open `n` keep-alive connections (GET /health) so early requests skip the TCP set-up."""
        url = self.client.base_url.rstrip("/") + "/health"

        async def ping() -> None:
            try:
                await self.http.get(url, timeout=5.0)
            except httpx.HTTPError:
                pass  # a server without /health: no warm connections, no harm

        await asyncio.gather(*(ping() for _ in range(n)))

    def _first_prompt(self, g: GenRequest) -> str:
        if g.session_id and g.prefix_tokens > 0:  # agent loop: shared system prompt first
            system = self.prompts.fresh(g.prefix_tokens, SYSTEM_PROMPT_KEY)
            return self.prompts.extend(system, g.prompt_tokens, g.rid)
        return self.prompts.fresh(g.prompt_tokens, g.rid)

    async def _call(self, g: GenRequest, at_s: float, prompt: str) -> None:
        call = CallResult.new(g, arrival_s=at_s)
        self.calls[g.rid] = call
        delay = at_s - self.clock()
        if delay > 0:
            await asyncio.sleep(delay)
        await send_request(self.http, self.client, g, prompt, call, self.clock)
        self.last_response_s = max(self.last_response_s, self.clock())
        self._release_children(g, call)

    def _release_children(self, g: GenRequest, call: CallResult) -> None:
        done_at = call.record.token_times[-1] if call.record.token_times else self.clock()
        for child in self.children.get(g.rid, []):
            if call.record.outcome is Outcome.FINISHED:
                prefix = call.prompt_text + call.text
                prompt = self.prompts.extend(prefix, child.prompt_tokens, child.rid)
                self._spawn(self._call(child, done_at + child.delay_s, prompt))
            else:
                self._cancel_loop(child)

    def _cancel_loop(self, g: GenRequest) -> None:
        c = CallResult.new(g, arrival_s=g.arrival_s)
        c.record.outcome = Outcome.CANCELLED
        c.error = "an earlier call of its agent loop did not finish"
        self.calls[g.rid] = c
        for child in self.children.get(g.rid, []):
            self._cancel_loop(child)


def _stats(calls: list[CallResult]) -> dict:
    sent = [c for c in calls if c.status or c.record.token_times]
    prompt_err = [abs(c.usage_prompt_tokens - c.record.prompt_tokens) for c in sent if c.usage_prompt_tokens is not None]
    return {
        "sent": len(sent),
        "http_status": dict(sorted(Counter(str(c.status) for c in sent).items())),
        "outcomes": dict(sorted(Counter(c.record.outcome.value for c in calls).items())),
        "output_tokens": sum(len(c.record.token_times) for c in calls),
        "prompt_tokens_abs_error_mean": sum(prompt_err) / len(prompt_err) if prompt_err else None,
        "stage_sources": dict(Counter(c.stage_source for c in calls if c.stage_source)),
        "errors": sorted({c.error for c in calls if c.error})[:5],
    }


async def replay(workload: Workload, client: ClientConfig, prompts: PromptTexts,
                 cfg: ReplayConfig = ReplayConfig()) -> ReplayResult:
    """Replay `workload` against `client.base_url` (see module docstring)."""
    return await _Replay(workload, client, prompts, cfg).run()


def replay_sync(workload: Workload, client: ClientConfig, prompts: PromptTexts,
                cfg: ReplayConfig = ReplayConfig()) -> ReplayResult:
    """`replay` in a fresh event loop (for synchronous callers)."""
    return asyncio.run(replay(workload, client, prompts, cfg))


def main(argv: list[str] | None = None) -> int:
    """`python -m eval.replay --workload W.json --base-url URL --tokenizer DIR`: replay a saved trace
    (eval.workloads.save_workload) and print eval.metrics.summarize as JSON."""
    import argparse
    import json
    import sys

    from eval.metrics import summarize
    from eval.workloads import load_workload

    p = argparse.ArgumentParser(prog="python -m eval.replay", description=main.__doc__.splitlines()[0])
    p.add_argument("--workload", required=True, help="JSON written by eval.workloads.save_workload")
    p.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:30000")
    p.add_argument("--tokenizer", required=True, help="directory with the server model's tokenizer.json")
    p.add_argument("--slo-via", default="body", choices=["body", "headers"])
    p.add_argument("--max-duration-s", type=float, default=300.0)
    p.add_argument("--max-requests", type=int, default=0)
    p.add_argument("--api-key", default=None)
    a = p.parse_args(argv)
    try:
        from sglang_slo.engine.tokenizer import Tokenizer

        w = load_workload(a.workload)
        prompts = PromptTexts(Tokenizer.load(a.tokenizer))
        res = replay_sync(w, ClientConfig(base_url=a.base_url, slo_via=a.slo_via, api_key=a.api_key), prompts,
                          ReplayConfig(max_duration_s=a.max_duration_s, max_requests=a.max_requests))
    except (ValueError, OSError) as e:
        print(f"replay: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"elapsed_s": res.elapsed_s, "window_s": res.window_s, "stopped_by_deadline":
                      res.stopped_by_deadline, "stats": res.stats, **summarize(res.records, res.window_s)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
