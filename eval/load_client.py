"""One streamed LLM call against an OpenAI-compatible server, recorded for `eval.metrics`.

    call = CallResult.new(gen_request, arrival_s=clock())
    await send_request(http, ClientConfig(base_url=url), gen_request, prompt_text, call, clock)
    call.record            # eval.metrics.RequestRecord: token times, stage starts, outcome

The request is `POST /v1/completions` with `stream: true`, `max_tokens` = the trace's output
length and `ignore_eos: true` (so the server generates exactly that many tokens), and the
SLO annotated the way SGLang users do: `custom_params: {"slo": {...}}` plus the top-level
`priority` (or `x-slo-*` headers). Per-token arrival times come from the SSE stream:
`stream_options.continuous_usage_stats` makes every chunk carry `usage.completion_tokens`, so
a chunk that carries several tokens (speculative decoding) stamps all of them with its
arrival time. HTTP 429 (and an in-stream 429 error) is a rejection, other errors are
failures; both are SLO misses, never exceptions.

The stream is split into events by `SseDataReader` (lines end at CR, LF or CRLF only, as the
SSE spec says), not by httpx's `aiter_lines`, which also breaks at U+0085, U+2028 and the
other characters of `str.splitlines`: SGLang writes those raw inside a chunk's JSON when the
model generates them, and a split there tore the chunk in two ("malformed SSE data").
"""

from __future__ import annotations

import json
import re
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator

import httpx

from eval.metrics import Outcome, RequestRecord
from eval.workloads import GenRequest
from protos.messages import Slo

STAGE_MARKER = "</think>"  # the server's default end marker of a reasoning stage


@dataclass(frozen=True)
class ClientConfig:
    """How calls are sent."""

    base_url: str
    """Server root, e.g. http://127.0.0.1:30000 (no trailing /v1)."""
    slo_via: str = "body"
    """body: `custom_params.slo` + `priority`; headers: `x-slo-class/-ttft-ms/-tpot-ms/-session`
    (stage values, which headers cannot carry, still go in the body)."""
    explicit_slo: bool = True
    """Send the trace's TTFT/TPOT values besides the class name (the trace's SLO wins over the
    server's class table); False = the class name only."""
    model: str | None = None
    """`model` field of the body (None = omitted)."""
    api_key: str | None = None
    temperature: float = 0.0
    request_timeout_s: float = 600.0
    """Per-call limit, seconds (the replay's deadline usually ends calls first)."""

    def __post_init__(self) -> None:
        if self.slo_via not in ("body", "headers"):
            raise ValueError(f"slo_via must be 'body' or 'headers', got {self.slo_via!r}")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")


@dataclass
class CallResult:
    """One call: the metrics record plus what the client saw on the wire."""

    record: RequestRecord
    status: int = 0
    """HTTP status of the response (0 = not sent or transport error)."""
    error: str = ""
    finish_reason: str | None = None
    text: str = ""
    """Generated text (the next agent call's prompt includes it)."""
    prompt_text: str = ""
    usage_prompt_tokens: int | None = None
    """Prompt tokens as the server counted them (usage.prompt_tokens)."""
    completion_tokens: int = 0
    chunks: int = 0
    """SSE data events with choices."""
    stage_source: str = ""
    """Where stage_starts came from: 'marker' (`</think>` in the text), 'trace' (the trace's
    per-stage token counts) or '' (single stage)."""
    stage_tokens: list[int] = field(default_factory=list)

    @classmethod
    def new(cls, g: GenRequest, arrival_s: float) -> CallResult:
        rec = RequestRecord(rid=g.rid, slo=g.slo, arrival_s=arrival_s, prompt_tokens=g.prompt_tokens,
                            session_id=g.session_id, stage_starts=[0])
        return cls(record=rec, stage_tokens=list(g.stage_tokens))


def stage_names(n: int) -> list[str]:
    """Names the server gives the unnamed stages of a class (sglang_slo.slo)."""
    from sglang_slo.slo import DEFAULT_STAGE_NAMES

    return DEFAULT_STAGE_NAMES.get(n, [f"stage{i}" for i in range(n)])


def slo_annotation(slo: Slo, session_id: str = "", stage_tokens: list[int] | None = None,
                   explicit: bool = True) -> dict:
    """The flat `custom_params["slo"]` dict for `slo` (milliseconds, per-stage keys)."""
    out: dict = {}
    if slo.slo_class:
        out["class"] = slo.slo_class
    if session_id:
        out["session"] = session_id
    if slo.best_effort:
        out["best_effort"] = True
    if explicit:
        out["ttft_ms"] = round(slo.ttft_s * 1000.0, 3)
        if not slo.stages:
            out["tpot_ms"] = round(slo.tpot_s * 1000.0, 3)
    for i, (name, st) in enumerate(zip(stage_names(len(slo.stages)), slo.stages)):
        if explicit:
            out[f"{name}_tpot_ms"] = round(st.tpot_s * 1000.0, 3)
            if i > 0 and st.ttft_s > 0:
                out[f"{name}_ttft_ms"] = round(st.ttft_s * 1000.0, 3)
        tokens = (stage_tokens[i] if stage_tokens and i < len(stage_tokens) else 0) or st.tokens
        if tokens:
            out[f"{name}_tokens"] = int(tokens)
    return out


def build_request(cfg: ClientConfig, g: GenRequest, prompt: str) -> tuple[dict, dict]:
    """(JSON body, headers) of the call for trace request `g` with prompt text `prompt`."""
    slo = slo_annotation(g.slo, g.session_id, g.stage_tokens, cfg.explicit_slo)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    if cfg.slo_via == "headers":
        for key, header in (("class", "x-slo-class"), ("ttft_ms", "x-slo-ttft-ms"),
                            ("tpot_ms", "x-slo-tpot-ms"), ("session", "x-slo-session")):
            if key in slo:
                headers[header] = str(slo.pop(key))
    body = {
        "prompt": prompt,
        "max_tokens": int(g.output_tokens),
        "ignore_eos": True,
        "temperature": cfg.temperature,
        "stream": True,
        "skip_special_tokens": False,  # every token shows up as text (stage markers included)
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "priority": int(g.slo.priority),
    }
    if slo:
        body["custom_params"] = {"slo": slo}
    if cfg.model:
        body["model"] = cfg.model
    return body, headers


_LINE_END = re.compile(rb"\r\n|\r|\n")


class SseDataReader:
    """The `data` of each server-sent event, from raw bytes fed in arbitrary pieces.

    `feed(piece)` returns the data of the events the piece completed (an event ends at a blank
    line; its `data:` lines are joined by a newline). Only CR, LF and CRLF end a line; UTF-8 is
    decoded per complete line, so a piece may end inside a character or between CR and LF.
    Comment lines (`:` keep-alives) and other fields are skipped; an event left unterminated
    when the stream ends is dropped, as the spec says.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []

    def feed(self, piece: bytes) -> list[str]:
        self._buf += piece
        return list(self._events())

    def close(self) -> list[str]:
        """At the end of the stream: the event a final lone CR completes, if any."""
        return self.feed(b"\n") if self._buf.endswith(b"\r") else []  # CR + LF: still one line end

    def _events(self) -> Iterator[str]:
        pos = 0
        while (m := _LINE_END.search(self._buf, pos)) is not None:
            if m.group() == b"\r" and m.end() == len(self._buf):
                break  # maybe the CR of a CRLF whose LF is in the next piece
            line = self._buf[pos:m.start()].decode("utf-8", "replace")
            pos = m.end()
            if not line:
                if self._data:
                    yield "\n".join(self._data)
                self._data = []
            elif line.startswith("data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(" ") else value)
        self._buf = self._buf[pos:]


async def sse_data(resp: httpx.Response) -> AsyncIterator[str]:
    """The `data` of each event of a streamed response (see `SseDataReader`)."""
    reader = SseDataReader()
    async for piece in resp.aiter_bytes():
        for data in reader.feed(piece):
            yield data
    for data in reader.close():
        yield data


def _error_text(raw: bytes | str) -> str:
    try:
        obj = json.loads(raw)
        return str(obj.get("error", {}).get("message") or obj)[:300]
    except (ValueError, AttributeError):
        return (raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw)[:300]


def _fail(call: CallResult, status: int, message: str) -> None:
    call.status = status or call.status
    call.error = message
    call.record.outcome = Outcome.REJECTED if status == 429 else Outcome.FAILED


async def send_request(http: httpx.AsyncClient, cfg: ClientConfig, g: GenRequest, prompt: str,
                       call: CallResult, clock: Callable[[], float]) -> CallResult:
    """Stream trace request `g` with prompt text `prompt`, filling `call` as tokens arrive.

    `clock()`: seconds on the clock of `call.record.arrival_s`. `call` is updated in place so
    a caller that cancels this coroutine (run deadline) keeps the partial record
    (outcome UNFINISHED). Never raises for HTTP or protocol errors: they become the outcome.
    """
    rec = call.record
    call.prompt_text = prompt
    body, headers = build_request(cfg, g, prompt)
    url = cfg.base_url.rstrip("/") + "/v1/completions"
    marker_at: int | None = None
    try:
        async with http.stream("POST", url, json=body, headers=headers, timeout=cfg.request_timeout_s) as resp:
            call.status = resp.status_code
            if resp.status_code != 200:
                _fail(call, resp.status_code, _error_text(await resp.aread()))
                return call
            async with aclosing(sse_data(resp)) as events:
                async for data in events:
                    if data.strip() == "[DONE]":
                        break
                    try:
                        obj = json.loads(data)
                    except ValueError:
                        _fail(call, 0, f"malformed SSE data: {data[:100]!r}")
                        return call
                    if not isinstance(obj, dict):
                        _fail(call, 0, f"SSE data is not a JSON object: {data[:100]!r}")
                        return call
                    if "error" in obj:
                        err = obj["error"] if isinstance(obj["error"], dict) else {"message": obj["error"]}
                        code = err.get("code")
                        _fail(call, code if isinstance(code, int) else 500, str(err.get("message", err))[:300])
                        return call
                    _take_chunk(call, obj, clock())
                    if marker_at is None and STAGE_MARKER in call.text:
                        marker_at = len(rec.token_times)
    except httpx.HTTPError as e:
        _fail(call, 0, f"{type(e).__name__}: {e}")
        return call
    call.completion_tokens = len(rec.token_times)
    _stage_starts(call, marker_at)
    if call.finish_reason in ("stop", "length"):
        rec.outcome = Outcome.FINISHED
    else:
        _fail(call, call.status, f"stream ended with finish_reason={call.finish_reason!r}")
    return call


def _take_chunk(call: CallResult, obj: dict, now: float) -> None:
    """Record one completion chunk that arrived at `now`: its text, its new tokens, finish reason."""
    rec = call.record
    choices = obj.get("choices") or []
    delta = "".join(c.get("text") or "" for c in choices)
    usage = obj.get("usage") or {}
    if choices:
        call.chunks += 1
    if usage.get("prompt_tokens") is not None:
        call.usage_prompt_tokens = int(usage["prompt_tokens"])
    total = usage.get("completion_tokens")
    new = (int(total) - len(rec.token_times)) if total is not None else (1 if delta else 0)
    rec.token_times.extend([now] * max(0, new))
    call.text += delta
    for c in choices:
        if c.get("finish_reason"):
            call.finish_reason = c["finish_reason"]


def _stage_starts(call: CallResult, marker_at: int | None) -> None:
    """Stage boundaries: the `</think>` marker if the model wrote it, else the trace's counts."""
    rec, n = call.record, len(call.record.token_times)
    if len(rec.slo.stages) < 2:
        return
    if marker_at is not None and marker_at < n:
        rec.stage_starts, call.stage_source = [0, marker_at], "marker"
        return
    starts, pos = [0], 0
    for k in call.stage_tokens[:-1]:
        pos += k
        if pos < n:
            starts.append(pos)
    rec.stage_starts, call.stage_source = starts, "trace"

