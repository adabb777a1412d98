"""bench-planner's round trip: a real sidecar process over ipc://, with an engine-like pause."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from sidecar import bench

H100 = str(Path(__file__).resolve().parents[1] / "configs/hardware/h100-llama3.1-8b-eagle3.yaml")


def test_roundtrip_with_a_gap_times_every_plan():
    r = bench.bench_roundtrip(H100, "fcfs", 16, iters=30, seed=0, gap_s=0.002)
    assert r["gap_ms"] == 2.0 and r["roundtrip"]["n"] == 30 and r["plan_inside"]["n"] == 30
    assert 0 < r["roundtrip"]["p50_ms"] and r["plan_inside"]["p50_ms"] <= r["roundtrip"]["max_ms"]
    assert r["report_bytes"] > 0 and r["plan_bytes"] > 0


def test_negative_gap_is_a_clear_error(capsys):
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    assert bench.run(p.parse_args(["--rt-gap-ms", "-1", "--sizes", ""])) == 2
    assert "--rt-gap-ms must be >= 0" in capsys.readouterr().err


def test_bare_pingpong_reference_answers_every_report():
    r = bench.bench_pingpong(H100, 16, iters=30, seed=0)
    assert r["roundtrip"]["n"] == 30 and 0 < r["roundtrip"]["p50_ms"] <= r["roundtrip"]["max_ms"]
    assert r["report_bytes"] > 0 and not r["server_busy_poll"]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_pinned_roundtrip_restores_this_process_affinity():
    before = os.sched_getaffinity(0)
    cpus = tuple(sorted(before)[:2])
    r = bench.bench_roundtrip(H100, "fcfs", 16, iters=30, seed=0, cpus=cpus)
    assert r["cpus"] == list(cpus) and r["roundtrip"]["n"] == 30
    assert os.sched_getaffinity(0) == before
