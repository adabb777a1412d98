"""`bench-engine` and `profile` end to end on a saved tiny random pair: valid JSON, a profile
the planner loads, numbers that hang together (no timing thresholds: benchmarks print them)."""

from __future__ import annotations

import argparse
import json

import pytest

from sglang_slo.engine import bench, profile
from sglang_slo.engine.loader import save_model
from sidecar.cost_model import load_profile
from test_engine_factories import tiny_pair


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    target, draft = tiny_pair(seed=12, noise=0.02)
    save_model(target.float(), d / "target")
    save_model(draft.float(), d / "draft")
    return d


def parse(module, argv):
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return p.parse_args(argv)


def test_bench_engine_prints_consistent_json(pair_dir, capsys):
    args = parse(bench, ["--pair", str(pair_dir), "--new-tokens", "12", "--prompt-len", "16",
                         "--concurrency", "3", "--repeats", "1", "--depth", "3", "--json"])
    assert bench.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    single, spec = out["single_stream"], out["single_stream_spec"]
    assert single["iterations"] == 12 * 4 and single["mean_accepted_per_verify"] == 0.0
    assert 0 < spec["mean_accepted_per_verify"] <= 3 and spec["iterations"] < 12 * 4  # drafts accepted
    assert out["spec_speedup"] == pytest.approx(spec["tokens_per_s"] / single["tokens_per_s"], rel=1e-2)
    assert set(out["concurrent"]["3"]) == {"plain", "spec", "spec_speedup"}
    assert out["concurrent"]["3"]["plain"]["python_overhead_fraction"] >= 0


def test_profile_writes_a_profile_the_planner_loads(pair_dir, tmp_path, capsys):
    yaml_path = tmp_path / "cpu-test.yaml"
    args = parse(profile, ["--model", str(pair_dir / "target"), "--draft", str(pair_dir / "draft"),
                           "--out", str(yaml_path), "--grid", "smoke", "--new-tokens", "6",
                           "--kv-capacity-tokens", "2048"])
    assert profile.run(args) == 0
    summary = json.loads(capsys.readouterr().out)
    prof = load_profile(yaml_path)
    assert prof.name == "cpu-test" and prof.engine.kv_capacity_tokens == 2048 and prof.engine.max_depth > 0
    assert prof.cost.iteration_time(0, 1, 0, 16) > 0
    assert summary["held_out"]["iterations"] > 0 and summary["train"]["iterations"] > 0
    by_kind = summary["held_out_by_kind"]
    assert by_kind and sum(k["iterations"] for k in by_kind.values()) == summary["held_out"]["iterations"]
    assert summary["noise_floor"]["median_ape_between_sweeps"] is not None  # 5 sweeps by default
    assert len(prof.acceptance_priors["default"]) == 2
