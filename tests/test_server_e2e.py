"""End to end: the real `openai` client and raw HTTP against a real `sglang-slo serve`
subprocess (tiny pair) with a real planner sidecar subprocess over ZeroMQ.

One server for the whole module (start-up dominates); the tests that change its state
(SIGKILL of the sidecar, shutdown) run last.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from server_support import ServerProc, pid_alive, tiny_pair

API_KEY = "test-key"
MAX_IN_FLIGHT = 120


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pair = tiny_pair()
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = ServerProc(["--model", str(pair / "target"), "--draft", str(pair / "draft"), "--policy", "slo_unified",
                      "--max-in-flight", str(MAX_IN_FLIGHT), "--kv-capacity-tokens", "32768"], log, api_key=API_KEY)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture
def aclient(server):
    """An async client for one `asyncio.run` (its connections belong to that loop)."""
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def post(server, path, body, headers=None, timeout=60.0):
    return httpx.post(server.url + path, json=body, headers={**server.headers(), **(headers or {})}, timeout=timeout)


# ---- happy paths ---------------------------------------------------------------------------


def test_models_health_and_auth(server, client):
    assert [m.id for m in client.models.list().data] == ["target"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_completion_stream_equals_non_stream(client):
    kw = dict(model="target", prompt="def main(", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 24 and full.usage.prompt_tokens > 0
    chunks = list(client.completions.create(stream=True, **kw))
    assert all(len(c.choices) == 1 for c in chunks)  # no usage-only chunk unless asked
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    with_usage = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == 24


def test_chat_stream_and_non_stream(client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "import os"}]
    kw = dict(model="target", messages=msgs, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    assert full.choices[0].message.role == "assistant" and full.usage.completion_tokens == 16
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_stop_string_trims_and_finishes(client):
    greedy = client.completions.create(model="target", prompt="class A:", max_tokens=20, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text
    stop = greedy[3:6]
    assert stop.strip(), greedy
    r = client.completions.create(model="target", prompt="class A:", max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == greedy[: greedy.index(stop)]


def test_generate_native_shape(server):
    r = post(server, "/generate", {"text": "import sys", "sampling_params": {"max_new_tokens": 12, "temperature": 0,
                                                                             "ignore_eos": True}})
    assert r.status_code == 200, r.text
    body = r.json()
    meta = body["meta_info"]
    assert meta["completion_tokens"] == 12 == len(body["output_ids"]) and meta["prompt_tokens"] > 0
    assert meta["finish_reason"]["type"] == "length" and meta["first_token_latency"] > 0
    assert meta["spec_accept_length"] >= 1.0
    with httpx.stream("POST", server.url + "/generate", headers=server.headers(), timeout=60,
                      json={"input_ids": [5, 6, 7], "stream": True,
                            "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}}) as s:
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["meta_info"]["completion_tokens"] == 8 and last["meta_info"]["finish_reason"]["type"] == "length"
    texts = [json.loads(e)["text"] for e in events[:-1]]
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1))  # cumulative, as SGLang


def test_slo_annotations_reach_metrics_per_class(server, client):
    before = server.metrics()
    key = 'sglang_slo_requests_finished_total{reason="length",slo_class="%s"}'
    kw = dict(model="target", prompt="x = 1", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    client.completions.create(**{**kw, "extra_body": {**kw["extra_body"], "custom_params": {"slo": {"class": "coding"}}}})
    client.completions.create(**kw, extra_headers={"x-slo-class": "summarization", "x-slo-tpot-ms": "500"})
    r = client.chat.completions.create(model="target", messages=[{"role": "user", "content": "q"}], max_tokens=4,
                                       extra_body={"ignore_eos": True, "priority": 3,
                                                   "custom_params": {"slo": {"class": "reasoning", "answer_tpot_ms": 400}}})
    assert r.model_extra["sglang_slo"]["slo_class"] == "reasoning"
    after = server.metrics()
    for cls in ("coding", "summarization", "reasoning"):
        assert after.get(key % cls, 0) == before.get(key % cls, 0) + 1, cls
        assert 'sglang_slo_slo_attainment{slo_class="%s"}' % cls in after
        assert after['sglang_slo_ttft_seconds_count{slo_class="%s"}' % cls] >= 1


# ---- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 100000}, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "logprobs": 3}, "logprobs"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "tok " * 400}, "prompt"),
    ({"prompt": [1, 10**9]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "custom_params": {"slo": {"class": "platinum"}}}, "custom_params.slo.class"),
    ({"prompt": "x", "custom_params": {"slo": {"ttft_ms": -5}}}, "custom_params.slo.ttft_ms"),
    ({"prompt": "x", "custom_params": {"slo": {"tpot_ms": 1e15}}}, "custom_params.slo.tpot_ms"),
    ({"prompt": "x", "custom_params": {"slo": {"tpot_ms": "fast"}}}, "custom_params.slo.tpot_ms"),
    ({"prompt": "x", "priority": "high"}, "priority"),
])
def test_bad_completion_input_is_400_naming_the_field(client, body, param):
    extra = {k: v for k, v in body.items() if k != "prompt"}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="target", prompt=body["prompt"], extra_body=extra)
    err = e.value.body
    assert err["param"] == param and param in err["message"], err


def test_nan_header_and_malformed_json_are_400(server):
    r = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "x", "custom_params": {"slo": {"tpot_ms": NaN}}}',
                   headers=server.headers())
    assert r.status_code == 400 and r.json()["error"]["param"] == "custom_params.slo.tpot_ms"
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"messages": [', headers=server.headers())
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = post(server, "/v1/completions", {"prompt": "x"}, headers={"x-slo-ttft-ms": "nan"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "header x-slo-ttft-ms"
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    r = post(server, "/generate", {"text": "x", "sampling_params": {"max_new_tokens": 4, "top_k": 5}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "sampling_params.top_k"
    r = post(server, "/generate", {"text": "x", "sampling_params": {"custom_params": {"slo": {"class": "nope"}}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "sampling_params.custom_params.slo.class"


def test_overload_gets_429_and_everything_else_completes(server, aclient):
    async def one(i):
        try:
            # best effort: only the bounded queue (not the planner's admission control) may refuse
            r = await aclient.completions.create(model="target", prompt=f"n = {i}", max_tokens=8, temperature=0,
                                                 extra_body={"ignore_eos": True,
                                                             "custom_params": {"slo": {"class": "batch"}}})
            return r.usage.completion_tokens
        except openai.RateLimitError as e:
            assert "overloaded" in e.body["message"]
            return 429

    async def burst():
        return await asyncio.gather(*(one(i) for i in range(MAX_IN_FLIGHT + 40)))

    results = asyncio.run(burst())
    assert 429 in results
    assert all(r in (8, 429) for r in results) and results.count(8) >= MAX_IN_FLIGHT // 2
    _wait_idle(server)


def _wait_idle(server, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = server.state()
        if st["in_flight"] == 0 and st["engine_requests"] == 0:
            return st
        time.sleep(0.1)
    raise AssertionError(f"server not idle: {server.state()}")


def test_client_disconnect_aborts_and_frees_kv(server):
    idle = _wait_idle(server)
    aborted = server.metrics().get("sglang_slo_requests_aborted_total", 0)
    body = {"model": "target", "prompt": "def f(x):", "max_tokens": 200, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=server.headers(), timeout=60) as s:
        lines = s.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        st = server.state()
        assert st["in_flight"] == 1 and st["kv_free_tokens"] < idle["kv_free_tokens"]
    # the connection is closed: the request must be aborted and its KV returned
    st = _wait_idle(server)
    assert st["kv_free_tokens"] == idle["kv_free_tokens"]
    assert server.metrics()["sglang_slo_requests_aborted_total"] == aborted + 1


def test_non_streaming_disconnect_aborts(server):
    idle = _wait_idle(server)
    aborted = server.metrics().get("sglang_slo_requests_aborted_total", 0)
    # 230 tokens take >= 0.27 s even speculating single-stream (bench-engine ~850 tok/s); the
    # client leaves after 0.1 s and the server checks every 0.05 s
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/completions", {"prompt": "while True:", "max_tokens": 230, "ignore_eos": True},
             timeout=httpx.Timeout(60, read=0.1))
    st = _wait_idle(server)
    assert st["kv_free_tokens"] == idle["kv_free_tokens"]
    assert server.metrics()["sglang_slo_requests_aborted_total"] == aborted + 1  # not run to the end


# ---- SGLang frontend -----------------------------------------------------------------------


def test_sgl_program_with_per_gen_slos(server):
    sgl = pytest.importorskip("sglang")
    from sglang_slo.lang import SloRuntimeEndpoint, slo, slo_gen

    @sgl.function
    def agent(s, question):
        s += question
        s += slo_gen("call", max_tokens=6, ignore_eos=True, temperature=0,
                     slo={"class": "tool-call", "session": "loop-1"})
        s += "\nresult: 42\n"
        with slo(s, {"class": "tool-final", "session": "loop-1", "tpot_ms": 900}):
            s += sgl.gen("answer", max_tokens=8, ignore_eos=True, temperature=0)

    before = server.metrics()
    backend = SloRuntimeEndpoint(server.url, api_key=API_KEY, default_slo={"class": "batch"})
    state = agent.run(question="def add(a, b):", backend=backend)
    assert state["call"] and state["answer"]
    assert state.get_meta_info("call")["slo_class"] == "tool-call"
    assert state.get_meta_info("answer")["slo_class"] == "tool-final"
    after = server.metrics()
    key = 'sglang_slo_requests_finished_total{reason="length",slo_class="%s"}'
    for cls in ("tool-call", "tool-final"):
        assert after.get(key % cls, 0) == before.get(key % cls, 0) + 1
    # a plain gen in a program without annotations falls back to the endpoint's default
    @sgl.function
    def plain(s):
        s += "x = "
        s += sgl.gen("x", max_tokens=2, ignore_eos=True)

    assert plain.run(backend=backend).get_meta_info("x")["slo_class"] == "batch"


# ---- SGLang's load client -------------------------------------------------------------------


def test_sglang_bench_serving_runs_clean_on_all_backends(server, tmp_path):
    pytest.importorskip("datasets", reason="sglang.bench_serving needs datasets (make bench-serving installs it)")
    if subprocess.run([sys.executable, "-c", "import sglang.benchmark.serving"], capture_output=True).returncode:
        pytest.skip("sglang.bench_serving is not importable here")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OPENAI_API_KEY=API_KEY)
    backends = ["sglang-oai", "sglang-oai-chat", "sglang"]
    run = subprocess.run(
        [sys.executable, "-m", "sglang_slo.server.bench_client", "--backends", ",".join(backends),
         "--out-dir", str(tmp_path), "--", "--base-url", server.url, "--tokenizer", str(tiny_pair() / "target"),
         "--dataset-name", "random-ids", "--random-input-len", "32", "--random-output-len", "8",
         "--random-range-ratio", "1", "--num-prompts", "6", "--request-rate", "inf", "--disable-tqdm",
         # a loose explicit SLO: admission control must not refuse these on a busy test machine
         "--header", "x-slo-ttft-ms=60000", "--goodput", "ttft:60000", "tpot:5000"],
        env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for b in backends:
        res = json.loads((tmp_path / f"{b}.jsonl").read_text().splitlines()[-1])
        assert res["completed"] == 6 and res["total_output_tokens"] == 6 * 8, b  # ignore_eos + usage honoured
        assert res["slo_attainment"] is not None and res["request_goodput"] > 0, b


# ---- sidecar failure and shutdown (change the server; keep last) -----------------------------


def test_sidecar_sigkill_during_100_requests(server, aclient, client):
    st0 = _wait_idle(server)
    old_pid = st0["sidecar_pid"]
    assert st0["planner_welcomed"] and pid_alive(old_pid)
    prompts = [f"def f{i}(x):" for i in range(5)]
    ref = {p: client.completions.create(model="target", prompt=p, max_tokens=12, temperature=0,
                                        extra_body={"ignore_eos": True}).choices[0].text for p in prompts}
    planned_before = server.metrics().get('sglang_slo_iterations_total{planned="true"}', 0)
    assert planned_before > 0  # the planner was really planning

    async def run():
        async def one(i):
            # best-effort class: the planner's admission control never rejects these, so every
            # request must come back complete whatever the sidecar does
            r = await aclient.completions.create(model="target", prompt=prompts[i % 5], max_tokens=12, temperature=0,
                                                 extra_body={"ignore_eos": True,
                                                             "custom_params": {"slo": {"class": "batch"}}})
            return i, r

        tasks = [asyncio.create_task(one(i)) for i in range(100)]
        await asyncio.sleep(0.3)
        os.kill(old_pid, signal.SIGKILL)
        return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    assert len(results) == 100
    for i, r in results:
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
        assert r.choices[0].text == ref[prompts[i % 5]]
    # the supervisor restarted the sidecar, the link handshook again and resynchronised
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (server.state()["planner_handshakes"] >= 2):
        time.sleep(0.2)
    st = server.state()
    assert st["sidecar_restarts"] >= 1 and st["sidecar_pid"] != old_pid and pid_alive(st["sidecar_pid"])
    assert st["planner_handshakes"] >= 2 and st["planner_welcomed"]
    assert server.metrics()["sglang_slo_sidecar_restarts_total"] >= 1
    # ... and planned operation resumed
    planned = server.metrics()['sglang_slo_iterations_total{planned="true"}']
    for p in prompts:
        client.completions.create(model="target", prompt=p, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    assert server.metrics()['sglang_slo_iterations_total{planned="true"}'] > planned


def test_sigterm_stops_server_and_sidecar(server):
    sidecar = server.state()["sidecar_pid"]
    assert server.stop() == 0
    deadline = time.monotonic() + 10
    while pid_alive(sidecar) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(sidecar)
