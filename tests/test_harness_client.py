"""The load client and trace replay against a small real SSE server (FastAPI + uvicorn on loopback).

The stub server (eval.stub_server) streams OpenAI completion chunks at a fixed TTFT and TPOT, so the recorded
times and the attainment computed from them by eval.metrics are known in advance. It records
what it received (bodies, headers, times) so the tests can check the SLO annotations, the
prompts' token counts and the closed-loop timing from the server's side.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eval.load_client import CallResult, ClientConfig, build_request, send_request, slo_annotation
from eval.metrics import Outcome, meets_adaserve, meets_slos_serve, summarize
from eval.prompt_text import PromptTexts
from eval.replay import ReplayConfig, cut_trace, replay_sync
from eval.stub_server import StubServer
from eval.workloads import GenRequest, Workload
from protos.messages import Slo, Stage
from sglang_slo.engine.tokenizer import Tokenizer, read_texts, stdlib_text_files

TTFT_S = 0.05  # seconds: the fake server's time to first token
TPOT_S = 0.02  # seconds between chunks


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(read_texts(stdlib_text_files(), max_bytes=300_000), vocab_size=512)


@pytest.fixture(scope="module")
def prompts(tok) -> PromptTexts:
    return PromptTexts(tok)


@pytest.fixture()
def server(tok):
    s = StubServer(TTFT_S, TPOT_S, count_tokens=tok.encode).start()
    yield s
    s.stop()


def _req(rid: str, arrival: float, prompt: int, output: int, slo: Slo, **kw) -> GenRequest:
    return GenRequest(rid=rid, arrival_s=arrival, prompt_tokens=prompt, output_tokens=output, slo=slo,
                      alphas=[0.8], **kw)


def _wl(reqs: list[GenRequest], duration: float = 1.0) -> Workload:
    return Workload(name="t", rate=1.0, duration_s=duration, seed=0, requests=reqs)


def test_prompt_text_has_the_requested_token_count(prompts, tok):
    for n in (1, 7, 33, 120):
        text = prompts.fresh(n, key=f"k{n}")
        assert len(tok.encode(text)) == n
        assert prompts.fresh(n, key=f"k{n}") == text  # deterministic
    base = prompts.fresh(40, "base")
    ext = prompts.extend(base, 90, "ext")
    assert ext.startswith(base) and abs(len(tok.encode(ext)) - 90) <= 1
    with pytest.raises(ValueError):
        prompts.fresh(0, "zero")


def test_slo_annotation_flat_and_accepted_by_the_server_intake():
    from sglang_slo.slo import SloCatalog, parse_slo

    slo = Slo(ttft_s=0.4, tpot_s=0.03, stages=[Stage(tpot_s=0.03), Stage(tpot_s=0.1, ttft_s=0.2)],
              slo_class="reasoning", priority=2)
    ann = slo_annotation(slo, "sess-1", [40, 20])
    assert all(isinstance(v, (str, int, float, bool)) for v in ann.values())  # SGLang custom_params are flat
    catalog = SloCatalog.load("configs/slo_classes.yaml")
    got = parse_slo({"slo": ann}, slo.priority, {}, catalog)
    assert got.session_id == "sess-1"
    assert got.slo.ttft_s == pytest.approx(0.4) and got.slo.priority == 2
    assert [s.tpot_s for s in got.slo.stages] == pytest.approx([0.03, 0.1])
    assert [s.tokens for s in got.slo.stages] == [40, 20]
    assert got.slo.stages[1].ttft_s == pytest.approx(0.2)
    # headers mode: class / TTFT / TPOT as x-slo-* headers, parsed the same
    g = _req("h", 0, 5, 5, Slo(ttft_s=0.5, tpot_s=0.05, slo_class="chat", priority=1), session_id="s9")
    body, headers = build_request(ClientConfig(base_url="http://x", slo_via="headers"), g, "hi")
    assert headers["x-slo-class"] == "chat" and "custom_params" not in body
    got = parse_slo(body.get("custom_params"), body["priority"], headers, catalog)
    assert (got.slo.ttft_s, got.slo.tpot_s, got.session_id) == pytest.approx((0.5, 0.05, "s9"))


def test_records_ttft_tpot_and_attainment(server, prompts, tok):
    tight = Slo(ttft_s=TTFT_S * 1.5, tpot_s=TPOT_S * 0.5, slo_class="coding", priority=2)  # cannot be met
    loose = Slo(ttft_s=0.5, tpot_s=TPOT_S * 2.5, slo_class="chat", priority=1)
    reqs = [_req("a", 0.0, 30, 20, loose), _req("b", 0.05, 12, 20, tight), _req("c", 0.1, 50, 16, loose)]
    res = replay_sync(_wl(reqs), ClientConfig(base_url=server.url), prompts, ReplayConfig(max_duration_s=30))
    assert not res.stopped_by_deadline
    by = {c.record.rid: c for c in res.calls}
    for c in res.calls:
        r = c.record
        assert r.outcome is Outcome.FINISHED and c.status == 200
        assert len(r.token_times) == next(g.output_tokens for g in reqs if g.rid == r.rid)
        assert c.usage_prompt_tokens == r.prompt_tokens  # the prompt text has the trace's length
        assert TTFT_S * 0.9 <= r.ttft_s < TTFT_S + 0.5
        assert r.tpot_s >= TPOT_S * 0.9  # the stub never emits faster than its TPOT
        # The recorded decode span fits inside the server's own emission span (no TTFT or
        # client-side delay counted as decode time); load-independent, unlike a bound on TPOT.
        e = next(e for e in server.received if e["body"]["max_tokens"] == len(r.token_times)
                 and e["body"]["custom_params"]["slo"]["class"] == r.slo_class)
        assert r.token_times[-1] - r.token_times[0] <= e["t_done"] - e["t_recv"] - TTFT_S * 0.9 + 0.25
        assert all(b >= a for a, b in zip(r.token_times, r.token_times[1:]))
    assert meets_adaserve(by["a"].record) and meets_slos_serve(by["a"].record)
    assert not meets_adaserve(by["b"].record) and not meets_slos_serve(by["b"].record)
    s = summarize(res.records, res.window_s)
    assert s["classes"]["chat"]["attainment_slos_serve"] == 1.0
    assert s["classes"]["coding"]["attainment_adaserve"] == 0.0
    # the SLO went out as custom_params.slo + priority, and max_tokens/ignore_eos as the trace says
    sent = {e["body"]["custom_params"]["slo"]["class"]: e["body"] for e in server.received}
    assert sent["coding"]["priority"] == 2 and sent["coding"]["custom_params"]["slo"]["tpot_ms"] == pytest.approx(10.0)
    assert sent["chat"]["ignore_eos"] is True and sent["chat"]["stream"] is True


def test_multi_token_chunks_share_a_time(server, prompts):
    server.tokens_per_chunk = 3
    slo = Slo(ttft_s=1.0, tpot_s=TPOT_S * 2.5, slo_class="chat")
    res = replay_sync(_wl([_req("a", 0.0, 10, 9, slo)]), ClientConfig(base_url=server.url), prompts)
    t = res.calls[0].record.token_times
    assert len(t) == 9 and len(set(t)) == 3
    assert t[0] == t[1] == t[2] and t[3] - t[2] >= TPOT_S * 3 * 0.9


def test_errors_become_misses_not_crashes(server, prompts):
    ok = Slo(ttft_s=1.0, tpot_s=1.0, slo_class="chat")
    reqs = [_req("ok", 0.0, 10, 5, ok), _req("r429", 0.0, 10, 5, Slo(ttft_s=1, tpot_s=1, slo_class="reject-me")),
            _req("r400", 0.0, 10, 5, Slo(ttft_s=1, tpot_s=1, slo_class="bad-me")),
            _req("mid", 0.0, 10, 10, Slo(ttft_s=1, tpot_s=1, slo_class="die-me"))]
    res = replay_sync(_wl(reqs), ClientConfig(base_url=server.url), prompts)
    by = {c.record.rid: c for c in res.calls}
    assert by["ok"].record.outcome is Outcome.FINISHED
    assert by["r429"].record.outcome is Outcome.REJECTED and by["r429"].status == 429
    assert by["r400"].record.outcome is Outcome.FAILED and by["r400"].status == 400
    assert "unknown" in by["r400"].error
    assert by["mid"].record.outcome is Outcome.REJECTED and 0 < len(by["mid"].record.token_times) < 10
    s = summarize(res.records, res.window_s)["overall"]
    assert s["attainment_slos_serve"] == 0.25 and s["rejected"] == 2 and s["failed"] == 1
    # nobody listening: a transport error is a failure too
    dead = ClientConfig(base_url="http://127.0.0.1:9")
    res = replay_sync(_wl([_req("x", 0.0, 5, 5, ok)]), dead, prompts)
    assert res.calls[0].record.outcome is Outcome.FAILED and res.calls[0].status == 0


def test_closed_loop_waits_for_previous_call_plus_tool_delay(server, prompts, tok):
    call_slo = Slo(ttft_s=1.0, tpot_s=0.1, slo_class="tool-call", priority=3)
    final_slo = Slo(ttft_s=1.0, tpot_s=0.2, slo_class="tool-final", priority=2)
    reqs = [_req("s0-c0", 0.0, 40, 8, call_slo, session_id="s0", prefix_tokens=30),
            _req("s0-c1", 0.0, 70, 8, call_slo, session_id="s0", after_rid="s0-c0", delay_s=0.3, prefix_tokens=48),
            _req("s0-c2", 0.0, 100, 6, final_slo, session_id="s0", after_rid="s0-c1", delay_s=0.5, prefix_tokens=78),
            _req("s1-c0", 0.1, 35, 5, call_slo, session_id="s1", prefix_tokens=30)]
    res = replay_sync(_wl(reqs), ClientConfig(base_url=server.url), prompts)
    by = {c.record.rid: c for c in res.calls}
    assert all(c.record.outcome is Outcome.FINISHED for c in res.calls)
    recv = {e["body"]["prompt"]: e for e in server.received}
    for prev, nxt, delay in (("s0-c0", "s0-c1", 0.3), ("s0-c1", "s0-c2", 0.5)):
        p, n = recv[by[prev].prompt_text], recv[by[nxt].prompt_text]
        assert n["t_recv"] - p["t_done"] >= delay - 0.01  # the server saw the tool delay
        assert n["t_recv"] - p["t_done"] < delay + 0.5
        # the next call's prompt is the previous context + its output + a tool result
        assert by[nxt].prompt_text.startswith(by[prev].prompt_text + by[prev].text)
        assert by[nxt].record.arrival_s == pytest.approx(by[prev].record.token_times[-1] + delay)
        assert abs(by[nxt].usage_prompt_tokens - by[nxt].record.prompt_tokens) <= 2
    # both sessions share the system prompt
    assert by["s0-c0"].prompt_text[:40] == by["s1-c0"].prompt_text[:40]
    assert {e["body"]["custom_params"]["slo"]["session"] for e in server.received} == {"s0", "s1"}


def test_failed_call_cancels_the_rest_of_its_loop(server, prompts):
    bad = Slo(ttft_s=1, tpot_s=1, slo_class="reject-me")
    ok = Slo(ttft_s=1, tpot_s=1, slo_class="tool-final")
    reqs = [_req("c0", 0.0, 10, 4, bad, session_id="s"),
            _req("c1", 0.0, 20, 4, ok, session_id="s", after_rid="c0", delay_s=0.01),
            _req("c2", 0.0, 30, 4, ok, session_id="s", after_rid="c1", delay_s=0.01)]
    res = replay_sync(_wl(reqs), ClientConfig(base_url=server.url), prompts)
    assert [c.record.outcome for c in res.calls] == [Outcome.REJECTED, Outcome.CANCELLED, Outcome.CANCELLED]
    assert len(server.received) == 1


def test_stage_starts_from_marker_or_trace(server, prompts):
    stages = [Stage(tpot_s=0.1), Stage(tpot_s=0.2)]
    marker = _req("m", 0.0, 10, 12, Slo(ttft_s=1, tpot_s=0.1, stages=stages, slo_class="marker-me"), stage_tokens=[8, 4])
    plain = _req("p", 0.0, 10, 12, Slo(ttft_s=1, tpot_s=0.1, stages=stages, slo_class="reasoning"), stage_tokens=[8, 4])
    res = replay_sync(_wl([marker, plain]), ClientConfig(base_url=server.url), prompts)
    by = {c.record.rid: c for c in res.calls}
    assert by["m"].record.stage_starts == [0, 7] and by["m"].stage_source == "marker"  # "</think>" was token 6
    assert by["p"].record.stage_starts == [0, 8] and by["p"].stage_source == "trace"
    sent = {e["body"]["custom_params"]["slo"]["class"]: e["body"]["custom_params"]["slo"] for e in server.received}
    assert sent["reasoning"]["think_tokens"] == 8 and sent["reasoning"]["answer_tokens"] == 4
    assert sent["reasoning"]["answer_tpot_ms"] == pytest.approx(200.0)


def test_bounded_by_duration_and_request_count(server, prompts):
    slo = Slo(ttft_s=1, tpot_s=1, slo_class="chat")
    reqs = [_req("long", 0.0, 10, 200, slo), _req("late", 5.0, 10, 5, slo)]  # 200 x 20 ms = 4 s
    t0 = time.monotonic()
    res = replay_sync(_wl(reqs), ClientConfig(base_url=server.url), prompts, ReplayConfig(max_duration_s=0.6))
    assert time.monotonic() - t0 < 3.0 and res.stopped_by_deadline
    by = {c.record.rid: c for c in res.calls}
    assert by["long"].record.outcome is Outcome.UNFINISHED and 0 < len(by["long"].record.token_times) < 200
    assert by["late"].record.outcome is Outcome.UNFINISHED and by["late"].status == 0
    # max_requests cuts in arrival order and keeps agent loops whole-prefix
    trace = [_req("a", 0.3, 5, 5, slo), _req("b", 0.1, 5, 5, slo, session_id="s"),
             _req("b2", 0.1, 5, 5, slo, session_id="s", after_rid="b"), _req("c", 0.2, 5, 5, slo)]
    assert [g.rid for g in cut_trace(trace, 2)] == ["b", "b2"]
    assert [g.rid for g in cut_trace(trace, 3)] == ["b", "b2", "c"]
    before = len(server.received)
    res = replay_sync(_wl(trace), ClientConfig(base_url=server.url), prompts, ReplayConfig(max_requests=1))
    assert [c.record.rid for c in res.calls] == ["b"] and len(server.received) == before + 1


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="slo_via"):
        ClientConfig(base_url="http://x", slo_via="carrier-pigeon")
    with pytest.raises(ValueError, match="base_url"):
        ClientConfig(base_url="localhost:1")
    with pytest.raises(ValueError):
        ReplayConfig(max_duration_s=0)


def test_send_request_directly(server, prompts):
    g = _req("d", 0.0, 16, 4, Slo(ttft_s=1, tpot_s=1, slo_class="chat"))
    call = CallResult.new(g, arrival_s=0.0)

    async def go():
        t0 = time.monotonic()
        async with httpx.AsyncClient() as http:
            return await send_request(http, ClientConfig(base_url=server.url), g, prompts.fresh(16, "d"), call,
                                      lambda: time.monotonic() - t0)

    out = asyncio.run(go())
    assert out is call and call.record.outcome is Outcome.FINISHED and call.text == " t0 t1 t2 t3"
    assert call.finish_reason == "length" and call.completion_tokens == 4


def test_replay_cli_on_a_saved_trace(server, tok, tmp_path, capsys):

    from eval.demo_serve import demo_trace
    from eval.replay import main
    from eval.workloads import save_workload

    w = demo_trace(TPOT_S, rate=4.0, duration_s=1.5, seed=2)
    save_workload(w, tmp_path / "w.json")
    tok.save(tmp_path / "tok")
    assert main(["--workload", str(tmp_path / "w.json"), "--base-url", server.url, "--tokenizer",
                 str(tmp_path / "tok"), "--max-duration-s", "60"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["overall"]["requests"] == len(w.requests) == out["overall"]["finished"]
    assert out["stats"]["prompt_tokens_abs_error_mean"] <= 1.0
    assert main(["--workload", str(tmp_path / "missing.json"), "--base-url", server.url,
                 "--tokenizer", str(tmp_path / "tok")]) == 2
    assert "replay:" in capsys.readouterr().err


# ---- invariants on random inputs ---------------------------------------------------------------


@st.composite
def _traces(draw):
    """Random traces of open requests and agent loops (each call after the previous one)."""
    slo = Slo(ttft_s=1.0, tpot_s=0.1, slo_class="chat")
    out = []
    for i in range(draw(st.integers(0, 12))):
        t = draw(st.floats(0, 10))
        for k in range(draw(st.integers(1, 3))):
            out.append(_req(f"r{i}-c{k}", t, 5, 5, slo, session_id=f"s{i}", after_rid=f"r{i}-c{k - 1}" if k else ""))
    return out


@settings(max_examples=100, deadline=None)
@given(_traces(), st.integers(0, 40))
def test_cut_trace_keeps_order_bound_and_closed_loops(trace, n):
    cut = cut_trace(trace, n)
    rids = [g.rid for g in cut]
    assert rids == [g.rid for g in trace if g.rid in set(rids)]  # trace order kept
    assert len(cut) <= (n or len(trace))
    assert all(not g.after_rid or g.after_rid in set(rids[: rids.index(g.rid)]) for g in cut)
    if n == 0 or n >= len(trace):
        assert rids == [g.rid for g in trace]


@settings(max_examples=100, deadline=None)
@given(ttft=st.floats(0.001, 100), tpots=st.lists(st.floats(0.001, 10), min_size=1, max_size=2),
       tokens=st.lists(st.integers(0, 5000), min_size=2, max_size=2), prio=st.integers(-5, 5),
       best_effort=st.booleans(), session=st.text("abc-19", max_size=8))
def test_slo_annotation_round_trips_through_the_server_intake(ttft, tpots, tokens, prio, best_effort, session):
    from sglang_slo.slo import SloCatalog, parse_slo

    stages = [Stage(tpot_s=t) for t in tpots] if len(tpots) == 2 else []
    slo = Slo(ttft_s=ttft, tpot_s=tpots[0], stages=stages, slo_class="reasoning" if stages else "chat",
              priority=prio, best_effort=best_effort)
    got = parse_slo({"slo": slo_annotation(slo, session, tokens if stages else None)}, prio, {},
                    SloCatalog.load("configs/slo_classes.yaml"))
    assert got.slo.ttft_s == pytest.approx(ttft, abs=1e-6) and got.slo.tpot_s == pytest.approx(tpots[0], abs=1e-6)
    assert got.slo.priority == prio and got.slo.best_effort == best_effort and got.session_id == session
    assert [s.tpot_s for s in got.slo.stages] == pytest.approx([s.tpot_s for s in stages], abs=1e-6)
    if stages:
        assert [s.tokens for s in got.slo.stages] == tokens


# --- SSE framing: what SGLang 0.5.23 really streams -------------------------------------------
# SGLang writes `data: {chunk.model_dump_json()}\n\n`; pydantic leaves non-ASCII raw, so a token
# the byte-level tokenizer decodes to U+0085 (NEL) or U+2028 travels unescaped inside the JSON.
# httpx's aiter_lines breaks lines there too (str.splitlines), which tore 4 of 187 chunks at
# rate 6 in the CPU comparison ("malformed SSE data").
ODD_TEXTS = ["plain", "nel\x85after", "ls\u2028ps\u2029", "vt\x0bff\x0cfs\x1c", "cr\rlf\n", "é€😀"]


def _sglang_stream(texts: list[str], eol: bytes = b"\n") -> tuple[bytes, list[dict]]:
    chunks = [{"id": "x", "object": "text_completion", "choices": [{"index": 0, "text": t,
               "finish_reason": "length" if i == len(texts) - 1 else None}],
               "usage": {"prompt_tokens": 3, "completion_tokens": i + 1}} for i, t in enumerate(texts)]
    body = b"".join(b": keep-alive" + eol + b"data: " + json.dumps(c, ensure_ascii=False).encode() + eol + eol
                    for c in chunks)
    return body + b"data: [DONE]" + eol + eol, chunks


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(ODD_TEXTS), min_size=1, max_size=6), st.sampled_from([b"\n", b"\r\n", b"\r"]),
       st.lists(st.integers(1, 400), max_size=8))
def test_sse_reader_splits_only_at_cr_lf_whatever_the_pieces(texts, eol, cuts):
    from eval.load_client import SseDataReader

    raw, chunks = _sglang_stream(texts, eol)
    reader, got = SseDataReader(), []
    for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(raw)]):
        got += reader.feed(raw[a:b])  # pieces end anywhere: inside a character, between CR and LF
    got += reader.close()
    assert [json.loads(d) for d in got[:-1]] == chunks and got[-1] == "[DONE]"


def test_raw_line_separators_in_streamed_text_are_not_a_failure(prompts):
    """A real HTTP server streaming SGLang's exact framing, one TCP write per odd place."""
    import http.server
    import threading

    raw, _ = _sglang_stream(ODD_TEXTS)
    cuts = sorted({raw.index(b"\xc2\x85") + 1, raw.index("€".encode()) + 2, raw.index(b"[DONE]")})

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()  # HTTP/1.0: the body ends when the connection closes
            for a, b in zip([0, *cuts], [*cuts, len(raw)]):
                self.wfile.write(raw[a:b])
                self.wfile.flush()
                time.sleep(0.01)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        g = _req("odd", 0.0, 4, len(ODD_TEXTS), Slo(ttft_s=1, tpot_s=1, slo_class="chat"))
        res = replay_sync(_wl([g]), ClientConfig(base_url=f"http://127.0.0.1:{srv.server_address[1]}"), prompts,
                          ReplayConfig(max_duration_s=20, warm_connections=0))
    finally:
        srv.shutdown()
        srv.server_close()
    call = res.calls[0]
    assert call.error == "" and call.record.outcome is Outcome.FINISHED
    assert call.text == "".join(ODD_TEXTS) and len(call.record.token_times) == len(ODD_TEXTS)
