"""The HTTP API (FastAPI): OpenAI completions/chat, SGLang's /generate, models, health, metrics.

Every handler follows the same path: parse + validate the body (400 naming the field) ->
tokenize -> SLO intake (`sglang_slo.slo.parse_slo`) -> `EngineBridge.submit` (429 when the
bounded queue is full) -> stream `Update`s through an incremental detokenizer -> respond
(JSON or SSE). A client that disconnects gets its request aborted (KV freed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pydantic
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from protos.messages import FinishReason
from sglang_slo.server.bridge import EngineBridge, EngineFailed, Job, Overloaded, RequestStream
from sglang_slo.server.detokenize import TextStream
from sglang_slo.server.errors import ApiError, bad_request
from sglang_slo.server.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from sglang_slo.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    unsupported_fields,
)
from sglang_slo.slo import SloCatalog, SloError, SloRequest, parse_slo

log = logging.getLogger(__name__)

_DISCONNECT_POLL_S = 0.05  # seconds between disconnect checks of a non-streaming request (cheap)
_CHAT_ROLES = {"developer": "system", "tool": "user"}  # roles our chat template lacks


@dataclass
class ServerContext:
    """Everything the handlers need (built by `launch`)."""

    tokenizer: object
    """`sglang_slo.engine.tokenizer.Tokenizer` (encode, decode, apply_chat_template)."""
    bridge: EngineBridge
    catalog: SloCatalog
    metrics: ServerMetrics
    model_name: str
    model_path: str
    max_context: int
    """Longest prompt + output, tokens."""
    api_key: str | None = None
    make_params: Callable[..., object] | None = None
    """SamplingParams factory (keyword arguments of `engine.request.SamplingParams`)."""
    debug_state: Callable[[], dict] = field(default=lambda: {})
    """Extra fields of GET /debug/state (KV free, sidecar pid, ...)."""


def build_app(ctx: ServerContext) -> FastAPI:
    async def authorize(request: Request) -> None:
        # a dependency, not an HTTP middleware: BaseHTTPMiddleware hides client disconnects
        if ctx.api_key and request.url.path not in ("/health", "/metrics"):
            if request.headers.get("authorization", "") != f"Bearer {ctx.api_key}":
                raise ApiError(401, "missing or wrong API key (Authorization: Bearer ...)")

    app = FastAPI(title="sglang-slo", docs_url=None, redoc_url=None, dependencies=[Depends(authorize)])
    app.state.ctx = ctx

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError):
        ctx.metrics.rejected.labels(str(e.status)).inc()
        return e.response()

    @app.get("/health")
    async def health():
        if ctx.bridge.error is not None:
            return ApiError(503, f"engine failed: {ctx.bridge.error}").response()
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": ctx.model_name, "object": "model", "created": 0,
                                            "owned_by": "sglang-slo", "root": ctx.model_path,
                                            "max_model_len": ctx.max_context}]}

    @app.get("/get_model_info")
    async def model_info():
        return {"model_path": ctx.model_path, "tokenizer_path": ctx.model_path, "is_generation": True}

    @app.get("/server_info")
    async def server_info():
        return {"model_path": ctx.model_path, "max_context": ctx.max_context, **ctx.debug_state()}

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        return Response("cache flushed (the embedded engine keeps no prefix cache)\n")

    @app.get("/debug/state")
    async def debug_state():
        return {"in_flight": ctx.bridge.in_flight, "steps": ctx.bridge.steps, **ctx.debug_state()}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = _parse(CompletionRequest, await _json(request))
        ids = _prompt_ids(ctx, req.prompt, "prompt")
        max_new = req.max_tokens if req.max_tokens is not None else 16
        return await _openai(ctx, request, req, ids, max_new, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = _parse(ChatCompletionRequest, await _json(request))
        ids = _chat_ids(ctx, req)
        max_new = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_new is None:
            max_new = max(1, ctx.max_context - len(ids))
        return await _openai(ctx, request, req, ids, max_new, chat=True)

    @app.post("/generate")
    async def generate(request: Request):
        req = _parse(GenerateRequest, await _json(request))
        return await _generate(ctx, request, req)

    return app


# ---- parsing -------------------------------------------------------------------------------


async def _json(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(None, f"malformed JSON body: {e}") from None
    if not isinstance(body, dict):
        raise bad_request(None, f"the JSON body must be an object, got {type(body).__name__}")
    return body


def _parse(model: type[pydantic.BaseModel], body: dict):
    try:
        req = model.model_validate(body)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "list[", "str", "int")))
        raise bad_request(param or None, f"{err['msg']} (got {_short(err.get('input'))})") from None
    bad = unsupported_fields(req)
    if bad is None and isinstance(req, GenerateRequest):
        bad = unsupported_fields(req.sampling_params, "sampling_params.")
    if bad:
        raise bad_request(*bad)
    return req


def _short(x: object) -> str:
    s = repr(x)
    return s if len(s) <= 60 else s[:57] + "..."


def _check_ids(ctx: ServerContext, ids: list[int], param: str) -> list[int]:
    if not ids:
        raise bad_request(param, "the prompt is empty")
    vocab = ctx.tokenizer.vocab_size
    if any(not 0 <= t < vocab for t in ids):
        raise bad_request(param, f"token ids must be in [0, {vocab})")
    if len(ids) >= ctx.max_context:
        raise bad_request(param, f"the prompt has {len(ids)} tokens; the model's context is {ctx.max_context} tokens")
    return ids


def _prompt_ids(ctx: ServerContext, prompt, param: str) -> list[int]:
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise bad_request(param, f"batches of {len(prompt)} prompts are not supported; send one per request")
        prompt = prompt[0]
    ids = ctx.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    return _check_ids(ctx, ids, param)


def _chat_ids(ctx: ServerContext, req: ChatCompletionRequest) -> list[int]:
    messages = []
    for i, m in enumerate(req.messages):
        content = m.content or ""
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad_request(f"messages.{i}.content.{j}", "only text content parts are supported")
                parts.append(part["text"])
            content = "".join(parts)
        messages.append({"role": _CHAT_ROLES.get(m.role, m.role), "content": content})
    try:
        ids = ctx.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except ValueError as e:
        raise bad_request("messages", str(e)) from None
    return _check_ids(ctx, list(ids), "messages")


def _intake(ctx: ServerContext, custom_params, priority, request: Request, where: str) -> SloRequest:
    try:
        return parse_slo(custom_params, priority, request.headers, ctx.catalog, where=where)
    except SloError as e:
        raise bad_request(e.field, e.message) from None


def _stop_list(stop) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _submit(ctx: ServerContext, ids: list[int], max_new: int, sampling, intake: SloRequest, rid: str) -> RequestStream:
    """Build the engine's SamplingParams and submit (400 / 429 on refusal)."""
    if max_new < 1:
        raise bad_request("max_tokens", "must be >= 1")
    if len(ids) + max_new > ctx.max_context:
        raise bad_request("max_tokens", f"prompt ({len(ids)} tokens) + max_tokens ({max_new}) exceeds the "
                          f"model's context of {ctx.max_context} tokens")
    try:
        params = ctx.make_params(
            max_new_tokens=max_new, temperature=float(sampling.temperature), top_p=float(sampling.top_p),
            stop_token_ids=tuple(sampling.stop_token_ids or ()), ignore_eos=bool(sampling.ignore_eos),
            seed=sampling.seed)
        params.validate()
    except ValueError as e:
        raise bad_request(None, str(e)) from None
    markers = [ctx.tokenizer.encode(m) for m in intake.stage_markers]
    try:
        return ctx.bridge.submit(Job(rid, ids, params, intake, markers))
    except Overloaded as e:
        raise ApiError(429, f"server overloaded: {e}; retry later") from None
    except EngineFailed as e:
        raise ApiError(503, str(e)) from None
    except ValueError as e:
        raise bad_request("rid", str(e)) from None


# ---- running a request ----------------------------------------------------------------------


@dataclass
class Piece:
    """Text released by one update, with the running state of the request."""

    text: str
    finish: str | None = None
    """OpenAI finish reason once the request ended: stop | length | abort."""
    matched_stop: str = ""


async def _pieces(ctx: ServerContext, stream: RequestStream, text: TextStream,
                  first: list | None = None) -> AsyncIterator[Piece]:
    """Detokenized output of a running request; ends the request early on a stop string."""
    pending = list(first or [])
    try:
        while True:
            u = pending.pop(0) if pending else await stream.queue.get()
            delta = text.push(u.token_ids) if u.token_ids else ""
            if text.stopped:
                ctx.bridge.abort(stream.rid, stopped=True)
                yield Piece(delta, "stop", text.stopped)
                return
            if u.finish is not None:
                delta += text.finish()
                if u.finish is FinishReason.ERROR:
                    raise ApiError(500, f"generation failed: {u.message}")
                if u.finish is FinishReason.REJECTED:
                    raise ApiError(429, f"request rejected by admission control: {u.message or 'overload'}")
                yield Piece(delta, _FINISH[u.finish])
                return
            if delta:
                yield Piece(delta)
    finally:
        if stream.finish is None:  # handler cancelled (client disconnect) -> free the KV
            ctx.bridge.abort(stream.rid)


_FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.ABORT: "abort"}


async def _first_update(stream: RequestStream, request: Request, ctx: ServerContext):
    """Wait for the first update (so a rejection can still become a 429) or a disconnect."""
    while True:
        try:
            return await asyncio.wait_for(stream.queue.get(), _DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                ctx.bridge.abort(stream.rid)
                return None


async def _collect(ctx: ServerContext, request: Request, stream: RequestStream, text: TextStream) -> Piece:
    """Run a non-streaming request to the end; abort it if the client disconnects."""

    async def run() -> Piece:
        out, finish, matched = [], None, ""
        async for p in _pieces(ctx, stream, text):
            out.append(p.text)
            finish, matched = p.finish or finish, p.matched_stop or matched
        return Piece("".join(out), finish or "abort", matched)

    task = asyncio.ensure_future(run())
    while True:
        done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            ctx.bridge.abort(stream.rid)
            return Piece("", "abort")


def _usage(stream: RequestStream) -> dict:
    p, c = stream.record.prompt_tokens, len(stream.output_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _slo_info(stream: RequestStream) -> dict:
    rec = stream.record
    return {"slo_class": rec.slo_class, "ttft_s": rec.ttft_s, "tpot_s": rec.tpot_s,
            "spec_accept_length": stream.spec_accept_length, "stage": stream.stage}


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def _openai(ctx: ServerContext, request: Request, req, ids: list[int], max_new: int, chat: bool):
    intake = _intake(ctx, req.custom_params, req.priority, request, "custom_params")
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    stream = _submit(ctx, ids, max_new, req, intake, rid)
    text = TextStream(lambda t: ctx.tokenizer.decode(t, skip_special_tokens=req.skip_special_tokens),
                      ids, _stop_list(req.stop))
    created = int(time.time())
    base = {"id": rid, "created": created, "model": ctx.model_name}

    if not req.stream:
        piece = await _collect(ctx, request, stream, text)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": piece.text},
                      "logprobs": None, "finish_reason": piece.finish,
                      "meta_info": {"spec_accept_length": stream.spec_accept_length}}
            body = {**base, "object": "chat.completion", "choices": [choice]}
        else:
            choice = {"index": 0, "text": piece.text, "logprobs": None, "finish_reason": piece.finish}
            body = {**base, "object": "text_completion", "choices": [choice]}
        return JSONResponse({**body, "usage": _usage(stream), "sglang_slo": _slo_info(stream)})

    first = await _first_update(stream, request, ctx)
    if first is None:
        return Response(status_code=499)
    if first.finish in (FinishReason.REJECTED, FinishReason.ERROR):  # still time for an error status
        async for _ in _pieces(ctx, stream, text, [first]):
            pass
    opts = req.stream_options
    include_usage = bool(opts and opts.include_usage)
    continuous = bool(opts and opts.continuous_usage_stats)
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta_text: str | None, finish: str | None, role: bool = False) -> dict:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": delta_text} if delta_text else {})
            c = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            c = {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": finish}
        out = {**base, "object": obj, "choices": [c]}
        if continuous or (finish and not include_usage):
            out["usage"] = _usage(stream)  # bench clients read completion_tokens from here
        return out

    async def events():
        if chat:
            yield _sse(chunk(None, None, role=True))
        gen = _pieces(ctx, stream, text, [first])
        try:
            async for p in gen:
                if p.finish:
                    if p.text:
                        yield _sse(chunk(p.text, None))
                    yield _sse(chunk(None, p.finish) if chat else chunk("", p.finish))
                    if include_usage:
                        yield _sse({**base, "object": obj, "choices": [], "usage": _usage(stream)})
                else:
                    yield _sse(chunk(p.text, None))
        except ApiError as e:
            yield _sse(e.body())
        finally:
            await _close(ctx, stream, gen)
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")


async def _close(ctx: ServerContext, stream: RequestStream, gen) -> None:
    """A streaming response ended (maybe the client went away): close its token generator."""
    await gen.aclose()
    if stream.finish is None:
        ctx.bridge.abort(stream.rid)


async def _generate(ctx: ServerContext, request: Request, req: GenerateRequest):
    sp = req.sampling_params
    if req.text is not None and req.input_ids is not None:
        raise bad_request("text", "give either text or input_ids, not both")
    if req.text is None and req.input_ids is None:
        raise bad_request("text", "one of text or input_ids is required")
    param = "text" if req.text is not None else "input_ids"
    ids = _prompt_ids(ctx, req.text if req.text is not None else req.input_ids, param)
    custom = sp.custom_params if sp.custom_params is not None else req.custom_params
    where = "sampling_params.custom_params" if sp.custom_params is not None else "custom_params"
    intake = _intake(ctx, custom, req.priority, request, where)
    t0 = time.monotonic()
    if sp.max_new_tokens == 0:  # SGLang frontend: prefix caching / prompt length only
        meta = {"id": req.rid or uuid.uuid4().hex, "finish_reason": {"type": "length", "length": 0},
                "prompt_tokens": len(ids), "completion_tokens": 0, "cached_tokens": 0, "e2e_latency": 0.0}
        return {"text": "", "output_ids": [], "meta_info": meta}
    rid = req.rid or f"gen-{uuid.uuid4().hex}"
    stream = _submit(ctx, ids, sp.max_new_tokens, sp, intake, rid)
    text = TextStream(lambda t: ctx.tokenizer.decode(t, skip_special_tokens=sp.skip_special_tokens),
                      ids, _stop_list(sp.stop))

    def meta(finish: str | None, matched: str = "") -> dict:
        rec = stream.record
        m = {"id": rid, "finish_reason": None, "prompt_tokens": rec.prompt_tokens,
             "completion_tokens": len(stream.output_ids), "cached_tokens": 0,
             "e2e_latency": time.monotonic() - t0,
             "first_token_latency": rec.ttft_s, "spec_verify_ct": stream.spec_verifies,
             "spec_accept_length": stream.spec_accept_length, "slo_class": rec.slo_class, "slo_stage": stream.stage}
        if finish:
            m["finish_reason"] = ({"type": "stop", "matched": matched} if matched else
                                  {"type": finish, **({"length": len(stream.output_ids)} if finish == "length" else {})})
        return m

    if not req.stream:
        piece = await _collect(ctx, request, stream, text)
        return {"text": piece.text, "output_ids": list(stream.output_ids), "meta_info": meta(piece.finish, piece.matched_stop)}

    first = await _first_update(stream, request, ctx)
    if first is None:
        return Response(status_code=499)
    if first.finish in (FinishReason.REJECTED, FinishReason.ERROR):
        async for _ in _pieces(ctx, stream, text, [first]):
            pass

    async def events():
        acc = ""
        gen = _pieces(ctx, stream, text, [first])
        try:
            async for p in gen:
                acc += p.text
                yield _sse({"text": acc, "output_ids": list(stream.output_ids), "meta_info": meta(p.finish, p.matched_stop)})
        except ApiError as e:
            yield _sse(e.body())
        finally:
            await _close(ctx, stream, gen)
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")
