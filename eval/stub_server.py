"""A small real OpenAI-style SSE server with known timing, to check and benchmark the load client.

    srv = StubServer(ttft_s=0.05, tpot_s=0.02, count_tokens=tok.encode); srv.start(); ...; srv.stop()
    python -m eval.stub_server --port 8000 --ttft-ms 50 --tpot-ms 20     # as its own process

POST /v1/completions streams `max_tokens` tokens (text " t0", " t1", ...): the first chunk
after `ttft_s`, then one chunk of `tokens_per_chunk` tokens every `tokens_per_chunk x tpot_s`
seconds, each with `usage.completion_tokens` (like `continuous_usage_stats`). Scripted SLO
classes (`custom_params.slo.class` or `x-slo-class`) exercise the error paths:
`reject-me` -> HTTP 429, `bad-me` -> HTTP 400, `die-me` -> a 429 error event halfway through
the stream, `marker-me` -> the text `</think>` as token `think_tokens - 2`.
Every request is kept in `received` ({body, headers, t_recv, t_done}; time.monotonic seconds),
also served as JSON by GET /received (for a stub in another process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time
from typing import Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


def build_app(state: StubServer) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/received")
    async def received():
        """When each request arrived (time.monotonic seconds) and its SLO annotation."""
        return [{"t_recv": e["t_recv"], "t_done": e["t_done"], "prompt": e["body"].get("prompt", ""),
                 "slo": (e["body"].get("custom_params") or {}).get("slo")} for e in state.received]

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        entry = {"body": body, "headers": dict(request.headers), "t_recv": time.monotonic(), "t_done": None}
        state.received.append(entry)
        slo = (body.get("custom_params") or {}).get("slo", {})
        cls = slo.get("class") or request.headers.get("x-slo-class", "")
        if cls == "reject-me":
            return JSONResponse({"error": {"message": "server overloaded", "code": 429}}, status_code=429)
        if cls == "bad-me":
            return JSONResponse({"error": {"message": "custom_params.slo.class: unknown SLO class", "code": 400}},
                                status_code=400)
        n = int(body.get("max_tokens") or 16)
        prompt_tokens = len(state.count_tokens(body.get("prompt", "")))
        marker_at = int(slo.get("think_tokens", 0)) - 2 if cls == "marker-me" else -1
        k_chunk = state.tokens_per_chunk

        async def events():
            await asyncio.sleep(state.ttft_s)
            sent = 0
            while sent < n:
                if sent and cls == "die-me" and sent >= n // 2:
                    yield "data: " + json.dumps({"error": {"message": "rejected by admission control", "code": 429}}) + "\n\n"
                    return
                k = min(k_chunk, n - sent)
                text = "".join("</think>" if sent + j == marker_at else f" t{sent + j}" for j in range(k))
                sent += k
                chunk = {"object": "text_completion",
                         "choices": [{"index": 0, "text": text, "finish_reason": "length" if sent == n else None}],
                         "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": sent}}
                yield "data: " + json.dumps(chunk) + "\n\n"
                if sent < n:
                    await asyncio.sleep(state.tpot_s * k)
            entry["t_done"] = time.monotonic()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


class StubServer:
    """The stub server on a free loopback port, run by uvicorn in a background thread."""

    def __init__(self, ttft_s: float = 0.05, tpot_s: float = 0.02, tokens_per_chunk: int = 1,
                 count_tokens: Callable[[str], list] = str.split, port: int = 0):
        if ttft_s < 0 or tpot_s < 0 or tokens_per_chunk < 1:
            raise ValueError("ttft_s, tpot_s >= 0 and tokens_per_chunk >= 1 required")
        self.ttft_s, self.tpot_s, self.tokens_per_chunk = ttft_s, tpot_s, tokens_per_chunk
        self.count_tokens = count_tokens
        """Prompt -> tokens (usage.prompt_tokens is its length); default: whitespace split."""
        self.received: list[dict] = []
        if not port:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(build_app(self), host="127.0.0.1", port=port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout_s: float = 20.0) -> StubServer:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise TimeoutError(f"stub server did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.stub_server", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ttft-ms", type=float, default=50.0)
    p.add_argument("--tpot-ms", type=float, default=20.0)
    p.add_argument("--tokens-per-chunk", type=int, default=1)
    a = p.parse_args(argv)
    srv = StubServer(a.ttft_ms / 1000, a.tpot_ms / 1000, a.tokens_per_chunk, port=a.port)
    srv.server.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
