"""The engine driven by the real planner sidecar process over real ZMQ sockets: plans are
applied, outputs stay exact, a killed planner costs only plans (fallback), a restarted one is
re-handshaken and resynchronised."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from protos.channel import ipc_endpoint
from sglang_slo.engine.planner_link import PlannerLink
from sglang_slo.engine.request import SamplingParams
from test_engine_factories import SLO, drive, make_engine, random_prompts, tiny_pair

ROOT = Path(__file__).resolve().parents[1]
HARDWARE = ROOT / "configs" / "hardware" / "cpu-tiny.yaml"
if not HARDWARE.is_file():
    HARDWARE = ROOT / "configs" / "hardware" / "h100-llama3.1-8b-eagle3.yaml"


def start_sidecar(endpoint: str, policy: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sidecar", "--endpoint", endpoint, "--policy", policy,
                             "--hardware", str(HARDWARE), "--log-level", "WARNING"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def pair():
    return tiny_pair(seed=2)


def wait_for_reply(link: PlannerLink, received_before: int, max_wait_s: float = 0.2) -> None:
    """Pace the engine like a forward slower than a plan: wait (bounded) until the planner has
    answered the report the last step sent. A silent planner (unwelcomed link) is not waited for."""
    deadline = time.monotonic() + max_wait_s
    while link.welcomed and link.plans_received <= received_before and time.monotonic() < deadline:
        link.poll(wait_ms=5)


def run_linked(link: PlannerLink, prompts, max_new=16, on_step=None, max_wall_s=120.0):
    for i, p in enumerate(prompts):
        link.add_request(f"r{i}", p, SamplingParams(max_new_tokens=max_new, ignore_eos=True), SLO)
    outputs, plan_steps, t0 = {}, [], time.monotonic()
    while link.engine.has_work:
        out = link.step()
        received = link.plans_received
        plan_steps.append(out.report.plan_step)
        for f in out.finished:
            outputs[f.rid] = f.output_ids
        if on_step is not None:
            on_step(len(plan_steps))
        wait_for_reply(link, received)
        assert time.monotonic() - t0 < max_wall_s
    return outputs, plan_steps


@pytest.mark.parametrize("policy", ["slo_unified", "fcfs"])
def test_plans_from_the_real_sidecar_are_applied_and_outputs_stay_exact(pair, policy):
    target, draft = pair
    prompts = random_prompts(12, seed=4)
    ref = drive(make_engine(target), prompts, lambda i: SamplingParams(max_new_tokens=16, ignore_eos=True))
    endpoint = ipc_endpoint("test-link")
    proc = start_sidecar(endpoint, policy)
    try:
        link = PlannerLink(make_engine(target, draft), endpoint)
        assert link.wait_welcome(60.0), proc.stderr.read1() if proc.poll() is not None else "no welcome"
        assert link.policy == policy
        outputs, plan_steps = run_linked(link, prompts)
        assert outputs == ref  # whatever the plans said, greedy output is exact
        assert link.plans_received > 0
        assert sum(s >= 0 for s in plan_steps) >= len(plan_steps) // 2  # mostly planned, not fallback
        link.engine.check_kv()
        link.close()
    finally:
        stop(proc)


def test_planner_crash_falls_back_and_restart_resyncs(pair):
    target, draft = pair
    prompts = random_prompts(16, seed=6)
    ref = drive(make_engine(target), prompts, lambda i: SamplingParams(max_new_tokens=48, ignore_eos=True))
    endpoint = ipc_endpoint("test-link-crash")
    procs = [start_sidecar(endpoint, "slo_unified")]
    try:
        link = PlannerLink(make_engine(target, draft), endpoint, silent_after_s=0.5)
        assert link.wait_welcome(60.0)
        # Phase 1: planned, then the planner dies after 3 steps; the run completes on fallback.
        outputs, plan_steps = run_linked(link, prompts[:8], max_new=48,
                                         on_step=lambda n: stop(procs[0]) if n == 3 else None)
        assert {k: v for k, v in outputs.items()} == {f"r{i}": ref[f"r{i}"] for i in range(8)}
        assert plan_steps[-1] == -1  # no planner: the fallback policy ran (and said so)
        # Phase 2: a new planner process on the same endpoint; the link notices the silence,
        # handshakes again and resyncs; the next requests are planned again.
        procs.append(start_sidecar(endpoint, "slo_unified"))
        deadline = time.monotonic() + 60
        while link.handshakes < 2 and time.monotonic() < deadline:
            link.poll(wait_ms=50)
        assert link.handshakes == 2
        for i, p in enumerate(prompts[8:], start=8):
            link.add_request(f"r{i}", p, SamplingParams(max_new_tokens=48, ignore_eos=True), SLO)
        got, steps = {}, []
        while link.engine.has_work:
            out = link.step()
            wait_for_reply(link, link.plans_received)
            steps.append(out.report.plan_step)
            got.update({f.rid: f.output_ids for f in out.finished})
        assert got == {f"r{i}": ref[f"r{i}"] for i in range(8, 16)}
        assert sum(s >= 0 for s in steps) >= len(steps) // 2
        link.engine.check_kv()
        link.close()
    finally:
        for p in procs:
            stop(p)
