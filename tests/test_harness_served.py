"""The load client and the served comparison against the real `sglang-slo serve` (tiny pair, CPU).

Real processes end to end: the server subprocess (engine + planner sidecar over ZMQ), HTTP
streaming from eval.replay, metrics from eval.metrics.
"""

from __future__ import annotations

import json

import pytest
from server_support import tiny_pair

from eval.demo_serve import demo_trace, run_served_comparison
from eval.server_process import ServerProcess
from eval.load_client import ClientConfig
from eval.metrics import Outcome, summarize
from eval.prompt_text import PromptTexts
from eval.replay import ReplayConfig, replay_sync
from eval.workloads import GenRequest, Workload
from protos.messages import Slo, Stage
from sglang_slo.engine.tokenizer import Tokenizer

MAX_IN_FLIGHT = 3  # the server answers 429 beyond this many concurrent requests


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


@pytest.fixture(scope="module")
def prompts(pair) -> PromptTexts:
    return PromptTexts(Tokenizer.load(pair / "target"))


@pytest.fixture(scope="module")
def server(pair, tmp_path_factory):
    log = tmp_path_factory.mktemp("served") / "server.log"
    with ServerProcess.for_pair(pair, "slo_unified", log, extra_args=("--max-in-flight", str(MAX_IN_FLIGHT))) as srv:
        yield srv


def _req(rid, arrival, prompt, output, slo, **kw) -> GenRequest:
    return GenRequest(rid=rid, arrival_s=arrival, prompt_tokens=prompt, output_tokens=output, slo=slo,
                      alphas=[0.8], **kw)


def test_agent_loop_and_reasoning_against_the_real_server(server, prompts):
    call = Slo(ttft_s=2.0, tpot_s=0.5, slo_class="tool-call", priority=3)
    final = Slo(ttft_s=2.0, tpot_s=0.5, slo_class="tool-final", priority=2)
    reasoning = Slo(ttft_s=2.0, tpot_s=0.5, stages=[Stage(tpot_s=0.5), Stage(tpot_s=1.0)], slo_class="reasoning")
    reqs = [_req("s-c0", 0.0, 40, 12, call, session_id="s", prefix_tokens=30),
            _req("s-c1", 0.0, 70, 12, call, session_id="s", after_rid="s-c0", delay_s=0.2, prefix_tokens=52),
            _req("s-c2", 0.0, 100, 24, final, session_id="s", after_rid="s-c1", delay_s=0.2, prefix_tokens=82),
            _req("r", 0.1, 30, 40, reasoning, stage_tokens=[28, 12])]
    w = Workload(name="t", rate=1.0, duration_s=1.0, seed=0, requests=reqs)
    res = replay_sync(w, ClientConfig(base_url=server.url), prompts, ReplayConfig(max_duration_s=120))
    by = {c.record.rid: c for c in res.calls}
    for g in reqs:
        c = by[g.rid]
        assert c.record.outcome is Outcome.FINISHED, (g.rid, c.status, c.error)
        assert len(c.record.token_times) == g.output_tokens == c.completion_tokens  # ignore_eos + max_tokens
        assert abs(c.usage_prompt_tokens - g.prompt_tokens) <= 2  # real text cut with the server's tokenizer
        assert c.record.ttft_s > 0
    for prev, nxt in (("s-c0", "s-c1"), ("s-c1", "s-c2")):
        assert by[nxt].record.arrival_s >= by[prev].record.token_times[-1] + 0.2 - 1e-6
        assert by[nxt].prompt_text.startswith(by[prev].prompt_text + by[prev].text)
    assert len(by["r"].record.stage_starts) == 2  # think -> answer (marker or the trace's count)
    s = summarize(res.records, res.window_s)
    assert set(s["classes"]) == {"tool-call", "tool-final", "reasoning"} and s["overall"]["finished"] == 4


def test_overload_429_and_bad_requests_are_misses(server, prompts):
    slo = Slo(ttft_s=5.0, tpot_s=1.0, slo_class="chat")
    burst = [_req(f"b{i}", 0.0, 20, 60, slo) for i in range(MAX_IN_FLIGHT + 5)]
    too_long = _req("long", 0.0, 200, 100, slo)  # 300 tokens > the 256-token context: HTTP 400
    unknown = _req("cls", 0.0, 10, 5, Slo(ttft_s=1.0, tpot_s=1.0, slo_class="no-such-class"))
    w = Workload(name="t", rate=1.0, duration_s=1.0, seed=0, requests=burst + [too_long, unknown])
    res = replay_sync(w, ClientConfig(base_url=server.url), prompts, ReplayConfig(max_duration_s=120))
    by = {c.record.rid: c for c in res.calls}
    assert by["long"].status == 400 and by["long"].record.outcome is Outcome.FAILED and "context" in by["long"].error
    assert by["cls"].status == 400 and "no-such-class" in by["cls"].error
    statuses = [by[g.rid].status for g in burst]
    assert statuses.count(429) >= 1 and statuses.count(200) >= 1
    assert all(by[g.rid].record.outcome is (Outcome.REJECTED if by[g.rid].status == 429 else Outcome.FINISHED)
               for g in burst)
    s = summarize(res.records, res.window_s)["overall"]
    assert s["rejected"] == statuses.count(429) and s["failed"] == 2


def test_run_served_comparison_smoke(pair, tmp_path):
    lines = []
    doc = run_served_comparison(("fcfs", "no-such-policy"), model_dir=pair, out_dir=tmp_path, rate=2.0,
                                duration_s=4.0, seed=3, max_duration_s=90, log=lines.append)
    run, skipped = doc["runs"]
    assert run["policy"] == "fcfs" and not run["error"]
    assert skipped["policy"] == "no-such-policy" and "unknown policy" in skipped["error"]
    assert doc["unloaded_tpot_s"] > 0 and doc["calibration"]["source"].startswith("measured")
    assert run["unloaded_tpot_s"] > 0  # the policy's own warm-up
    overall = run["measured"]["overall"]
    assert overall["requests"] == doc["requests"] > 0
    assert overall["finished"] == doc["requests"], run["replay_stats"]
    assert run["replay_stats"]["prompt_tokens_abs_error_mean"] <= 1.0
    assert 0.0 <= overall["attainment_slos_serve"] <= 1.0
    if doc["hardware"]:  # the simulator ran on the same trace
        assert run["simulated"]["overall"]["requests"] == doc["requests"]
    assert json.loads((tmp_path / "served_demo.json").read_text())["requests"] == doc["requests"]
    assert "| fcfs | all |" in (tmp_path / "served_demo.md").read_text()
    assert any("served comparison" in x for x in lines)
    assert (doc["device"], doc["dtype"]) == ("cpu", "float32")


def test_served_comparison_on_a_missing_device_is_a_clear_error(pair, tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is here: nothing to refuse")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        run_served_comparison(("fcfs",), model_dir=pair, out_dir=tmp_path, rate=1.0, duration_s=1.0,
                              placement=("cuda", "float32"))


def test_demo_trace_fits_the_tiny_context_and_scales_slos():
    w = demo_trace(0.01, rate=2.0, duration_s=20.0, seed=1)
    assert all(g.prompt_tokens + g.output_tokens <= 256 for g in w.requests)
    kinds = {g.slo.slo_class for g in w.requests}
    assert {"tool-call", "chat", "coding"} <= kinds
    coding = next(g for g in w.requests if g.slo.slo_class == "coding")
    assert coding.slo.tpot_s == pytest.approx(1.2 * 0.01)  # cpu_tpot_multiplier x unloaded TPOT
    assert any(g.after_rid for g in w.requests)
    with pytest.raises(ValueError, match="context"):
        spec = {"name": "big", "classes": [{"kind": "single", "slo_class": "chat",
                                            "prompt": {"dist": "fixed", "value": 200},
                                            "output": {"dist": "fixed", "value": 100}}]}
        demo_trace(0.01, spec=spec)


def test_a_policy_that_cannot_run_is_reported_not_fatal(pair, tmp_path):
    lines = []
    with pytest.raises(RuntimeError, match="no-such-policy"):  # before any server starts
        run_served_comparison(("no-such-policy",), model_dir=pair, out_dir=tmp_path, rate=1.0, duration_s=1.0,
                              log=lines.append)
    assert any("FAILED" in x and "unknown policy" in x for x in lines)


def test_bad_sizes_fail_before_any_server(pair, tmp_path):
    for kw in ({"rate": 0.0}, {"duration_s": -1.0}, {"max_duration_s": 0.0}):
        with pytest.raises(ValueError):
            run_served_comparison(("fcfs",), model_dir=pair, out_dir=tmp_path, **kw)
    assert not (tmp_path / "logs").exists()


def test_server_that_exits_is_a_clear_error(tmp_path):
    (tmp_path / "target").mkdir()
    (tmp_path / "draft").mkdir()
    with pytest.raises(RuntimeError, match="server exited"):
        with ServerProcess.for_pair(tmp_path, "fcfs", tmp_path / "server.log"):
            pass
