"""Capacity bisection and the `sglang-slo simulate` command (a real subprocess)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval.capacity import find_capacity

ROOT = Path(__file__).resolve().parent.parent
H100 = str(ROOT / "configs/hardware/h100-llama3.1-8b-eagle3.yaml")


def test_capacity_brackets_the_target():
    c = find_capacity("adaserve", H100, "fcfs", definition="adaserve", start_rate=8.0, duration_s=4.0,
                      rel_tol=0.25, max_probes=7)
    assert c.rate > 0 and c.attainment >= 0.9
    failed = [r for r, a in c.probes if a < 0.9]
    assert failed and min(failed) > c.rate  # a higher rate missed the target
    assert all(a >= 0.9 for r, a in c.probes if r <= c.rate)


def test_capacity_rejects_bad_arguments():
    with pytest.raises(ValueError):
        find_capacity("adaserve", H100, "fcfs", definition="nope")
    with pytest.raises(ValueError):
        find_capacity("adaserve", H100, "fcfs", target=1.5)


def run_cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sglang_slo.cli", "simulate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_simulate_json():
    p = run_cli("--workload", "adaserve", "--hardware", H100, "--policies", "fcfs,priority", "--rate", "3",
                "--duration", "3", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert set(doc["results"]) == {"fcfs", "priority"}
    res = doc["results"]["fcfs"]
    assert res["overall"]["requests"] == doc["requests"] > 0
    assert set(res["classes"]) <= {"coding", "chat", "summarization"}
    assert 0.0 <= res["overall"]["attainment_adaserve"] <= 1.0
    assert res["stats"]["iterations"] > 0


def test_simulate_table_and_errors():
    p = run_cli("--workload", "adaserve", "--policies", "fcfs", "--rate", "2", "--duration", "2")
    assert p.returncode == 0, p.stderr
    assert "att SLOs-Serve" in p.stdout and "fcfs" in p.stdout
    bad = run_cli("--policies", "nope")
    assert bad.returncode == 2 and "unknown policies" in bad.stderr
    missing = run_cli("--workload", "no-such-workload", "--policies", "fcfs")
    assert missing.returncode == 2 and "not found" in missing.stderr
    bad_hw = run_cli("--hardware", "/nonexistent.yaml", "--policies", "fcfs")
    assert bad_hw.returncode == 2 and "nonexistent" in bad_hw.stderr
