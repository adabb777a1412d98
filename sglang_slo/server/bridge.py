"""The async bridge: the engine steps in its own thread; HTTP handlers talk to it via queues.

    handler (event loop)                     engine thread
    bridge.submit(job) -> RequestStream ---> inbox (deque + wake event)
                                             driver.add / abort, driver.step()
    async for update in stream   <---------  loop.call_soon_threadsafe(queue.put_nowait)

The engine thread never waits on the event loop and the event loop never waits on the
engine: submit and abort only append to the inbox. Tokens travel as id lists; handlers
detokenize. The bridge also keeps what metrics need per request (token times, stage starts)
and detects stage markers (reasoning's `</think>`) in the output ids.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from eval.metrics import Outcome, RequestRecord, meets_slos_serve
from protos.messages import FinishReason
from sglang_slo.server.driver import Driver, StepResult
from sglang_slo.server.metrics import ServerMetrics
from sglang_slo.slo import SloRequest

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.005  # seconds the engine thread sleeps when it has nothing to do


class Overloaded(Exception):
    """The bounded queue of in-flight requests is full (HTTP 429)."""


class EngineFailed(Exception):
    """The engine thread died (HTTP 503)."""


@dataclass
class Job:
    """One generation request as the engine needs it."""

    rid: str
    prompt_ids: list[int]
    params: object
    """`sglang_slo.engine.request.SamplingParams`."""
    intake: SloRequest
    stage_marker_ids: Sequence[Sequence[int]] = ()
    """Token ids of each stage's end marker (`intake.stage_markers` encoded)."""


@dataclass
class Update:
    """New output of one request (engine thread -> handler)."""

    token_ids: list[int]
    finish: FinishReason | None = None
    message: str = ""


@dataclass
class RequestStream:
    """A submitted request as its handler sees it: an async stream of `Update`s."""

    job: Job
    queue: asyncio.Queue
    record: RequestRecord
    output_ids: list[int] = field(default_factory=list)
    finish: FinishReason | None = None
    stopped_by_server: bool = False
    """Ended by the server (stop string matched) rather than by the engine."""
    spec_verifies: int = 0
    spec_accepted: int = 0
    stage: int = 0

    @property
    def rid(self) -> str:
        return self.job.rid

    @property
    def spec_accept_length(self) -> float:
        """Mean tokens committed per verify forward (1.0 without speculation)."""
        return (self.spec_verifies + self.spec_accepted) / self.spec_verifies if self.spec_verifies else 1.0

    async def updates(self):
        """Yield `Update`s until the request finishes."""
        while True:
            u: Update = await self.queue.get()
            yield u
            if u.finish is not None:
                return


class EngineBridge:
    """Owns the engine thread; thread-safe submit/abort for the event loop."""

    def __init__(self, driver: Driver, metrics: ServerMetrics, max_in_flight: int = 256,
                 clock: Callable[[], float] = time.monotonic):
        self.driver = driver
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self.clock = clock
        self._streams: dict[str, RequestStream] = {}  # engine thread + submit (under lock)
        self._lock = threading.Lock()
        self._inbox: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        """Set if the engine thread died (the server then answers 503)."""
        self.steps = 0

    # ---- event-loop side ------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=10)

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    def submit(self, job: Job) -> RequestStream:
        """Queue a request; raises `Overloaded` when `max_in_flight` requests are in flight."""
        if self.error is not None:
            raise EngineFailed(f"the engine failed: {self.error}")
        with self._lock:
            if len(self._streams) >= self.max_in_flight:
                raise Overloaded(f"{len(self._streams)} requests in flight (max {self.max_in_flight})")
            if job.rid in self._streams:
                raise ValueError(f"duplicate request id {job.rid!r}")
            rec = RequestRecord(rid=job.rid, slo=job.intake.slo, arrival_s=self.clock(),
                                prompt_tokens=len(job.prompt_ids), session_id=job.intake.session_id)
            stream = RequestStream(job=job, queue=asyncio.Queue(), record=rec)
            self._streams[job.rid] = stream
        self._inbox.append(("add", stream))
        self._wake.set()
        self.metrics.running.set(len(self._streams))
        return stream

    def call_on_engine_thread(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the engine thread before its next step (any thread may call this)."""
        self._inbox.append(("call", fn))
        self._wake.set()

    def abort(self, rid: str, stopped: bool = False) -> None:
        """Abort a request (client gone, or `stopped=True`: a stop string ended it)."""
        self._inbox.append(("abort", rid, stopped))
        self._wake.set()

    # ---- engine thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox()
                if self.driver.has_work():
                    self._deliver(self.driver.step())
                    self.steps += 1
                else:
                    self.driver.idle()
                    self._wake.wait(_IDLE_WAIT_S)
                    self._wake.clear()
        except BaseException as e:  # noqa: BLE001  (report, fail every request, stop)
            log.exception("engine thread died")
            self.error = e
            with self._lock:
                streams = list(self._streams.values())
            for s in streams:
                self._finish(s, FinishReason.ERROR, f"engine failure: {e}")
        finally:
            self.driver.close()

    def _drain_inbox(self) -> None:
        while self._inbox:
            cmd = self._inbox.popleft()
            if cmd[0] == "add":
                stream: RequestStream = cmd[1]
                job = stream.job
                err = self.driver.add(job.rid, job.prompt_ids, job.params, job.intake, stream.record.arrival_s)
                if err:
                    self._finish(stream, FinishReason.ERROR, err)
            elif cmd[0] == "call":
                cmd[1]()
            else:
                _, rid, stopped = cmd
                stream = self._streams.get(rid)
                if stream is None or stream.finish is not None:
                    continue
                self.driver.abort(rid)
                stream.stopped_by_server = stopped
                self._finish(stream, FinishReason.STOP if stopped else FinishReason.ABORT, "")

    def _deliver(self, res: StepResult) -> None:
        now = self.clock()
        out: list[tuple[RequestStream, Update]] = []
        for rid, ids in res.new_tokens.items():
            s = self._streams.get(rid)
            if s is None or s.finish is not None or not ids:
                continue
            s.record.token_times.extend([now] * len(ids))
            start = len(s.output_ids)
            s.output_ids.extend(ids)
            self._check_stage(s, start)
            out.append((s, Update(list(ids))))
        for rid, (verified, accepted) in res.spec.items():
            s = self._streams.get(rid)
            if s is not None:
                s.spec_verifies += verified
                s.spec_accepted += accepted
        self._post(out)
        for rid, (reason, message) in res.finished.items():
            s = self._streams.get(rid)
            if s is not None and s.finish is None:
                self._finish(s, reason, message)

    def _check_stage(self, s: RequestStream, start: int) -> None:
        """Advance the SLO stage when the current stage's end marker was generated."""
        for first_token in new_stage_starts(s.output_ids, s.job.stage_marker_ids, s.stage, start):
            s.stage += 1
            s.record.stage_starts = (s.record.stage_starts or [0]) + [first_token]
            self.driver.set_stage(s.rid, s.stage)

    def _finish(self, s: RequestStream, reason: FinishReason, message: str) -> None:
        s.finish = reason
        with self._lock:
            self._streams.pop(s.rid, None)
            n = len(self._streams)
        rec = s.record
        rec.outcome = {
            FinishReason.STOP: Outcome.FINISHED,
            FinishReason.LENGTH: Outcome.FINISHED,
            FinishReason.REJECTED: Outcome.REJECTED,
            FinishReason.ABORT: Outcome.CANCELLED,
        }.get(reason, Outcome.FAILED)
        label = reason.name.lower()
        met = meets_slos_serve(rec) if rec.outcome is Outcome.FINISHED else False
        self.metrics.request_done(rec.slo_class, label, rec.ttft_s, rec.tpot_s, met)
        if reason is FinishReason.ABORT and not s.stopped_by_server:
            self.metrics.aborted.inc()
        self.metrics.running.set(n)
        self._post([(s, Update([], reason, message))])

    def _post(self, items: list[tuple[RequestStream, Update]]) -> None:
        if items and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_put_all, items)


def new_stage_starts(ids: Sequence[int], markers: Sequence[Sequence[int]], stage: int, new_from: int) -> list[int]:
    """Output-token indices where later stages begin, given tokens `ids[new_from:]` just arrived.

    `markers[i]` (token ids) ends stage i; the request is in `stage`. A marker counts once it
    is complete, including one that straddles `new_from`; the next stage starts right after it.
    """
    starts, prev_end = [], 0
    while stage < len(markers) and markers[stage]:
        m = list(markers[stage])
        i0 = max(prev_end, new_from - len(m) + 1, 0)
        hit = next((i for i in range(i0, len(ids) - len(m) + 1) if list(ids[i : i + len(m)]) == m), None)
        if hit is None:
            break
        stage += 1
        prev_end = hit + len(m)
        starts.append(prev_end)
    return starts


def _put_all(items: list[tuple[RequestStream, Update]]) -> None:
    for stream, update in items:
        stream.queue.put_nowait(update)
