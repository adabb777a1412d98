"""End to end on CPU: the real SGLang 0.5.23 server serving a tiny Llama with the plugin and
a real planner sidecar (slo_unified), driven through the OpenAI API and /generate.

One server for the whole module (start-up is 15-90 s on 2 shared cores). Evidence comes from
the plugin's per-iteration log (SGLANG_SLO_REPORT_LOG: one line per IterationReport, plus the
plan that built the batch).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import time
from collections import Counter

import httpx
import pytest

pytest.importorskip("sglang", reason="SGLang is not installed (make sglang-cpu)")

from tests.sglang_support.cpu_server import SglangCpuServer  # noqa: E402
from tests.sglang_support.tiny_llama import make_tiny_llama  # noqa: E402

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def text(seed: int, words: int) -> str:
    r = random.Random(seed)
    return " ".join(r.choice(WORDS) for _ in range(words))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("sglang-e2e")
    model = make_tiny_llama(work / "tiny")
    srv = SglangCpuServer(model, plugin=True, policy="slo_unified", workdir=work,
                          extra_args=("--enable-priority-scheduling",)).start()
    yield srv
    srv.stop()


def iterations(srv: SglangCpuServer, since_s: float = 0.0) -> list[dict]:
    if not srv.report_log.exists():
        return []
    lines = [json.loads(line) for line in srv.report_log.read_text().splitlines() if line.strip()]
    return [it for it in lines if it["start_s"] >= since_s]


async def _generate(client, url, prompt, new_tokens, slo, delay=0.0, priority=None):
    await asyncio.sleep(delay)
    body = {"text": prompt, "sampling_params": {"max_new_tokens": new_tokens, "ignore_eos": True, "temperature": 0,
                                                "custom_params": {"slo": slo}}}
    if priority is not None:
        body["priority"] = priority
    r = await client.post(url + "/generate", json=body, timeout=300)
    return r.status_code, r.json()


def run_all(coros_factory):
    async def main():
        async with httpx.AsyncClient() as client:
            return await asyncio.gather(*coros_factory(client))

    return asyncio.run(main())


def test_openai_chat_and_completions_carry_slos(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="none")
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0,
        extra_body={"custom_params": {"slo": {"class": "chat", "ttft_ms": 2000, "tpot_ms": 200}}, "priority": 2,
                    "ignore_eos": True})
    assert chat.usage.completion_tokens == 8 and chat.choices[0].message.content
    comp = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=6, temperature=0,
                                     extra_body={"custom_params": {"slo": {"class": "coding"}}, "ignore_eos": True})
    assert comp.usage.completion_tokens == 6


def test_generate_carries_slo(server):
    code, body = run_all(lambda c: [_generate(c, server.url, "x = 1", 10, {"ttft_ms": 1500, "tpot_ms": 100})])[0]
    assert code == 200 and body["meta_info"]["completion_tokens"] == 10


def test_invalid_slo_fails_that_request_with_a_clear_error(server):
    r = httpx.post(server.url + "/generate", timeout=60, json={
        "text": "hi", "sampling_params": {"max_new_tokens": 4, "custom_params": {"slo": {"tpot_ms": -1}}}})
    assert r.status_code == 400 and "invalid SLO" in r.text and "tpot_ms" in r.text
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        "custom_params": {"slo": {"class": "no-such-class"}}})
    assert r.status_code == 400 and "unknown SLO class" in r.text
    ok = httpx.post(server.url + "/generate", timeout=60, json={"text": "hi", "sampling_params": {"max_new_tokens": 3}})
    assert ok.status_code == 200  # the server keeps serving


def test_plans_drive_admission_and_batch_composition(server):
    t0 = time.monotonic()

    def jobs(c):
        decoders = [_generate(c, server.url, text(i, 20), 300, {"class": "coding"}) for i in range(4)]
        burst = [_generate(c, server.url, text(100 + i, 100 + 30 * i), 16,
                           {"class": ("chat", "summarization", "coding")[i % 3]}, delay=0.6) for i in range(8)]
        return decoders + burst

    results = run_all(jobs)
    assert [code for code, _ in results] == [200] * 12
    assert [b["meta_info"]["completion_tokens"] for _, b in results] == [300] * 4 + [16] * 8
    its = iterations(server, since_s=t0)
    planned = [it for it in its if it["plan_step"] >= 0]
    assert len(planned) >= 10, f"only {len(planned)} of {len(its)} iterations ran under a plan"
    seen: set[str] = set()
    for it in its:
        arrivals = 0  # prompt tokens of requests the plan did not know (its arrival allowance)
        for rid, tokens in it["prefill"].items():
            if it["plan_prefill"] is not None and rid not in seen:  # a new admission under a plan
                if rid in it["plan_prefill"]:
                    assert tokens <= it["plan_prefill"][rid]
                else:
                    assert it["plan_arrival_tokens"], f"step {it['step']}: {rid} admitted outside the plan"
                    arrivals += tokens
        assert arrivals <= (it["plan_arrival_tokens"] or 0)
        seen.update(it["prefill"])
    # SGLang without --enable-mixed-chunk (the hello says so): plans price a prefill forward as
    # a stall of every decoder. With these TPOTs (30 ms against ~5 ms iterations) the decoders
    # absorb it, so every prompt goes whole, at once (deferral that saves a decoder:
    # test_policies_prefill_only.py), and plans let arrivals they do not know prefill at once.
    # A plan chunks a prompt only where the forward's token budget ran out (SGLang's own
    # fallback chunks are not counted).
    left = Counter(rid for it in planned for rid in it["prefill"])  # planned forwards per prompt
    assert left
    for it in planned:
        left.subtract(it["prefill"].keys())
        cut = [rid for rid in it["prefill"] if left[rid] > 0 and rid in (it["plan_prefill"] or {})]  # more to come
        full = sum((it["plan_prefill"] or {}).values()) >= 0.95 * it["plan_budget"]
        assert not cut or full, f"step {it['step']}: plan split {cut} below its budget: {it}"
    assert any(it["plan_arrival_tokens"] for it in planned), "no plan with an arrival allowance"


def test_sidecar_sigkill_mid_run_every_request_completes(server):
    pids = server.sidecar_pids()
    assert pids, "no planner process found"
    t0 = time.monotonic()
    killed_at = []

    async def killer():
        # kill once these requests are being served under plans (start-up speed varies with load)
        for _ in range(600):
            await asyncio.sleep(0.05)
            if any(it["plan_step"] >= 0 and it["mode"] == "decode" for it in iterations(server, since_s=t0)):
                break
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        killed_at.append(time.monotonic())
        return None, None

    def jobs(c):
        reqs = [_generate(c, server.url, text(200 + i, 30), 250, {"class": "chat"}) for i in range(16)]
        return reqs + [killer()]

    results = run_all(jobs)[:-1]
    assert [code for code, _ in results] == [200] * 16
    assert [b["meta_info"]["completion_tokens"] for _, b in results] == [250] * 16
    its = iterations(server, since_s=t0)
    assert any(it["plan_step"] >= 0 for it in its if it["end_s"] < killed_at[0])
    assert any(it["plan_step"] == -1 for it in its if it["start_s"] > killed_at[0]), "no fallback after the kill"
    # the supervisor restarts the planner; the plugin handshakes again and plans resume
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(re.findall(r"planner link up .*welcome #", server.tail(400))) < 2:
        time.sleep(1)
    assert len(re.findall(r"planner link up .*welcome #", server.tail(400))) >= 2
    t1 = time.monotonic()
    code, body = run_all(lambda c: [_generate(c, server.url, text(999, 30), 40, {"class": "chat"})])[0]
    assert code == 200
    assert any(it["plan_step"] >= 0 for it in iterations(server, since_s=t1))


def test_sgl_program_slos_reach_sglang_scheduler(server):
    """An @sgl.function program with per-gen SLOs (sglang_slo.lang) against real SGLang + plugin:
    each annotated gen's request is tracked by the plugin (only requests carrying an SLO are),
    and an invalid per-gen SLO fails that gen with the plugin's message."""
    import sglang as sgl

    from sglang_slo.lang import SloRuntimeEndpoint, slo, slo_gen

    @sgl.function
    def agent(s, question):
        s += question
        s += slo_gen("call", max_tokens=4, ignore_eos=True, temperature=0,
                     slo={"class": "tool-call", "session": "lang-1"})
        s += "\nresult: 42\n"
        with slo(s, {"class": "tool-final", "session": "lang-1"}):
            s += sgl.gen("answer", max_tokens=4, ignore_eos=True, temperature=0)

    backend = SloRuntimeEndpoint(server.url)
    since = time.monotonic() - 1.0
    state = agent.run(question="def add(a, b):", backend=backend)
    rids = {state.get_meta_info("call")["id"], state.get_meta_info("answer")["id"]}
    deadline = time.monotonic() + 30
    seen: set[str] = set()
    while time.monotonic() < deadline and not rids <= seen:
        seen = {rid for it in iterations(server, since) for rid in it["rids"]}
        time.sleep(0.2)
    assert rids <= seen, f"annotated gens not tracked by the plugin: {rids - seen}"

    @sgl.function
    def bad(s):
        s += "x = "
        s += slo_gen("x", max_tokens=2, slo={"tpot_ms": -1})

    failed = bad.run(backend=backend)
    assert "invalid SLO" in str(failed.error())
