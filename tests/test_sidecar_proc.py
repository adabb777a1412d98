"""The real sidecar process (`python -m sidecar`) over real ZeroMQ ipc:// sockets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protos import messages as m
from protos.channel import EngineChannel, ipc_endpoint

ROOT = Path(__file__).resolve().parent.parent
HW = ROOT / "configs" / "hardware" / "h100-llama3.1-8b-eagle3.yaml"
D = m.Decision


def start_sidecar(policy: str = "fcfs", *extra: str) -> tuple[subprocess.Popen, str]:
    endpoint = ipc_endpoint("test")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "--endpoint", endpoint, "--policy", policy, "--hardware", str(HW),
         "--log-level", "INFO", *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    line = proc.stdout.readline()
    assert "listening" in line, proc.stderr.read()
    return proc, endpoint


def stop(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return rc, proc.stderr.read()


def connect(endpoint: str, **hello_kw) -> tuple[EngineChannel, m.PlannerWelcome]:
    ch = EngineChannel(endpoint)
    args = dict(protocol_version=m.PROTOCOL_VERSION, engine="test", spec_modes=[m.SpecMode.CHAIN],
                max_batch_tokens=2048, kv_capacity_tokens=100_000, max_depth=4, max_width=1, config_hash="cfg1")
    args.update(hello_kw)
    deadline = time.monotonic() + 10
    while not ch.send(m.EngineHello(**args)):  # IMMEDIATE: queued only once connected
        assert time.monotonic() < deadline, "could not connect"
        time.sleep(0.01)
    welcome = ch.recv(5000)
    assert isinstance(welcome, m.PlannerWelcome)
    return ch, welcome


def recv_plan(ch: EngineChannel, timeout_ms: int = 5000) -> m.Plan:
    msg = ch.recv(timeout_ms)
    assert isinstance(msg, m.Plan), msg
    return msg


@pytest.fixture(scope="module")
def sidecar():
    proc, endpoint = start_sidecar("fcfs", "--set", "chunk_size=256", "--set", "spec_k=2")
    yield endpoint
    rc, _ = stop(proc)
    assert rc == 0


def test_handshake_and_plan_after_report(sidecar):
    ch, welcome = connect(sidecar)
    assert welcome.accepted and welcome.policy == "fcfs" and welcome.config_hash == "cfg1"
    ch.send(m.RequestArrived("a", 600, 20, m.Slo(1.0, 0.05), 0.0))
    assert ch.recv(200) is None  # arrivals alone do not trigger a plan
    ch.send(m.IterationReport(0, 0.0, 0.01, -1, 0, 0, 0, 0, 99_000))
    plan = recv_plan(ch)
    assert plan.step == 2 and plan.based_on_step == 0
    assert [(c.rid, c.tokens) for c in plan.prefill] == [("a", 256)]
    assert [(d.rid, d.decision) for d in plan.decisions] == [("a", D.ADMIT)]
    assert plan.valid_until_s > 0.01 and plan.plan_latency_s > 0
    ch.send(m.IterationReport(1, 0.01, 0.02, -1, 0, 0, 0, 0, 99_000))
    plan = recv_plan(ch)  # plan 2's chunk is in flight: the next 256
    assert plan.step == 3 and [(c.rid, c.tokens) for c in plan.prefill] == [("a", 256)]
    ch.send(m.IterationReport(2, 0.02, 0.03, 2, 256, 0, 0, 256, 98_000, [m.RequestProgress("a", 256, 0, 256)]))
    plan = recv_plan(ch)  # 256 done + 256 in flight (plan 3): the last 88 tokens
    assert plan.step == 4 and [(c.rid, c.tokens) for c in plan.prefill] == [("a", 88)]
    ch.close()


def test_wrong_protocol_version_is_refused_with_a_reason(sidecar):
    ch, welcome = connect(sidecar, protocol_version=m.PROTOCOL_VERSION + 7)
    assert not welcome.accepted
    assert "protocol version" in welcome.reason
    ch.send(m.IterationReport(0, 0.0, 0.01, -1, 0, 0, 0, 0, 1000))
    assert ch.recv(300) is None  # a refused engine gets no plans
    ch.close()


def test_garbage_frames_are_skipped(sidecar):
    ch, welcome = connect(sidecar)
    assert welcome.accepted
    ch.sock.send(b"\x00\x01garbage")
    ch.sock.send(b"")
    ch.sock.send_multipart([b"two", b"parts"])
    ch.send(m.RequestArrived("g", 10, 5, m.Slo(1.0, 0.05), 0.0))
    ch.send(m.IterationReport(0, 0.0, 0.01, -1, 0, 0, 0, 0, 99_000))
    plan = recv_plan(ch)
    assert [(d.rid, d.decision) for d in plan.decisions] == [("g", D.ADMIT)]
    ch.close()


def test_resync_replaces_state_and_answers_with_a_plan(sidecar):
    ch, _ = connect(sidecar)
    ch.send(m.RequestArrived("stale", 10, 5, m.Slo(1.0, 0.05), 0.0))
    snap = m.RequestSnapshot(m.RequestArrived("x", 100, 50, m.Slo(1.0, 0.05), 5.0), 100, 3, 5.2, 0, D.ADMIT)
    ch.send(m.Resync(now_s=6.0, step=70, requests=[snap], kv_free_tokens=50_000))
    plan = recv_plan(ch)
    assert plan.step == 71 and plan.based_on_step == 70
    assert [(e.rid, e.depth, e.tree_cap) for e in plan.decode] == [("x", 2, 3)]
    assert plan.decisions == [] and plan.prefill == []  # "stale" is gone
    ch.close()


def test_sigterm_exits_cleanly():
    proc, endpoint = start_sidecar("priority")
    ch, welcome = connect(endpoint)
    assert welcome.accepted and welcome.policy == "priority"
    ch.close()
    rc, err = stop(proc)
    assert rc == 0
    assert "stopped after" in err


def test_busy_poll_sidecar_plans_and_exits_cleanly():
    proc, endpoint = start_sidecar("fcfs", "--busy-poll", "--cpus", str(max(os.sched_getaffinity(0))))
    ch, welcome = connect(endpoint)
    assert welcome.accepted
    ch.send(m.RequestArrived("a", 100, 20, m.Slo(1.0, 0.05), 0.0))
    ch.send(m.IterationReport(0, 0.0, 0.01, -1, 0, 0, 0, 0, 99_000))
    plan = recv_plan(ch)
    assert plan.step == 2 and [(c.rid, c.tokens) for c in plan.prefill] == [("a", 100)]
    ch.close()
    rc, err = stop(proc)
    assert rc == 0 and "stopped after 1 plans" in err


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--policy", "nope", "--hardware", str(HW)], "unknown policy 'nope'"),
        (["--policy", "fcfs", "--hardware", "/no/such/profile.yaml"], "cannot read"),
        (["--policy", "fcfs", "--hardware", str(HW), "--set", "chunk_size"], "KEY=VALUE"),
        (["--policy", "fcfs", "--hardware", str(HW), "--set", "bogus=1"], "unknown option"),
        (["--policy", "fcfs", "--hardware", str(HW), "--horizon-iters", "0"], "must be > 0"),
        (["--policy", "fcfs", "--hardware", str(HW), "--cpus", "100000"], "Invalid argument"),
    ],
)
def test_bad_arguments_exit_with_a_message(args, needle):
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", "--endpoint", ipc_endpoint("bad"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 2 and needle in out.stderr


def test_messages_without_a_hello_are_ignored(sidecar):
    stranger = EngineChannel(sidecar)
    deadline = time.monotonic() + 10
    while not stranger.send(m.IterationReport(0, 0.0, 0.01, -1, 0, 0, 0, 0, 1000)):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert stranger.recv(300) is None
    stranger.close()


def test_burst_of_reports_gets_plans_on_the_newest_state(sidecar):
    ch, _ = connect(sidecar)
    ch.send(m.Resync(now_s=0.0, step=100, requests=[], kv_free_tokens=50_000))
    assert recv_plan(ch).based_on_step == 100
    for step in range(101, 111):
        ch.send(m.IterationReport(step, step * 0.01, step * 0.01 + 0.01, -1, 0, 0, 0, 0, 50_000))
    seen = []
    while not seen or seen[-1] != 110:
        seen.append(recv_plan(ch).based_on_step)
    assert seen == sorted(seen) and len(seen) <= 10  # queued reports are drained before planning
    ch.close()


def _late_plan_horizon(*extra: str) -> float:
    """Validity of the plan after an engine (a real one, not 'sim') started an iteration with
    only a ~0.5 s old plan: seconds past that report's end."""
    proc, endpoint = start_sidecar("fcfs", *extra)
    try:
        ch, _ = connect(endpoint)
        ch.send(m.Resync(now_s=10.0, step=0, requests=[], kv_free_tokens=50_000))
        recv_plan(ch)  # made at ~10.0 (engine clock)
        ch.send(m.IterationReport(1, 10.0, 10.5, -1, 0, 0, 0, 0, 50_000))
        recv_plan(ch)
        ch.send(m.IterationReport(2, 10.5, 10.8, -1, 0, 0, 0, 0, 50_000))  # busy, fell back
        plan = recv_plan(ch)
        ch.close()
    finally:
        stop(proc)
    return plan.valid_until_s - 10.8


def test_plan_validity_adapts_to_plan_lag_unless_fixed_on_the_command_line():
    assert _late_plan_horizon("--max-horizon-ms", "400") >= 0.4  # capped at 0.4 s (lag ~0.5 s)
    assert _late_plan_horizon("--max-horizon-ms", "400", "--horizon-iters", "4") < 0.2  # 4 predicted iterations
