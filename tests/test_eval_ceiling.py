"""Capacity ceilings (eval/ceiling.py): class shares, the steady-state bound, giving up work."""

from pathlib import Path

import pytest

from eval.ceiling import arrivals, capacity_bound, ceiling, drop_class, drop_costliest, work_shares
from eval.compare import make_workload

ROOT = Path(__file__).resolve().parent.parent
H100 = str(ROOT / "configs/hardware/h100-llama3.1-8b-eagle3.yaml")


@pytest.fixture(scope="module")
def mixed():
    return make_workload("mixed", H100, rate=8.0, duration_s=20.0, seed=3)


def test_work_shares_are_fractions_per_column(mixed):
    shares = work_shares(mixed)
    assert set(shares) == {r.slo.slo_class for r in mixed.requests}
    for col in ("requests", "output_tokens", "prefill_tokens"):
        assert sum(s[col] for s in shares.values()) == pytest.approx(1.0)
    # reasoning streams are few but long: the workload's defining imbalance
    assert shares["reasoning"]["output_tokens"] > 3 * shares["reasoning"]["requests"]


def test_dropping_a_loop_class_takes_the_rest_of_each_loop(mixed):
    rest, gone = drop_class(mixed, "tool-call")
    kept = {r.rid for r in rest.requests}
    assert gone == len(mixed.requests) - len(rest.requests) > 0
    assert not any(r.slo.slo_class == "tool-call" for r in rest.requests)
    assert all(not r.after_rid or r.after_rid in kept for r in rest.requests)  # no orphaned call
    finals = [r for r in mixed.requests if r.slo.slo_class == "tool-final"]
    assert finals and not any(r.rid in kept for r in finals if r.after_rid)  # they waited on tool calls


def test_ceiling_counts_the_given_up_requests_as_misses():
    res = ceiling("mixed", H100, ["fcfs"], [4.0], duration_s=8.0, seed=1)
    assert res["bound_without_reasoning"]["rate"] > res["bound"]["rate"] > 0
    assert res["given_up_class"] == "reasoning"  # the largest share of output tokens
    row = res["rates"]["4.0"]["fcfs"]
    n = len(make_workload("mixed", H100, rate=4.0, duration_s=8.0, seed=1).requests)
    assert row["reasoning_requests_given_up"] > 0
    assert row["attainment_without_reasoning"] <= 1 - row["reasoning_requests_given_up"] / n + 1e-4  # rounded to 4 places


def test_capacity_bound_scales_with_the_work(mixed):
    n = arrivals(mixed.requests)
    one = capacity_bound(mixed.requests, n, H100)
    assert one["rate"] > 0 and 0 < one["prefill_share"] < 1
    d = one["decode"]  # an iteration within the tightest pace: E <= 1 + depth tokens per tightest TPOT
    assert d["iteration_ms"] <= 1e3 * min(r.slo.tpot_s for r in mixed.requests) * (1 + d["depth"])
    # the same work brought by twice the arrivals: each arrival carries half, the rate doubles
    assert capacity_bound(mixed.requests, 2 * n, H100)["rate"] == pytest.approx(2 * one["rate"], rel=0.01)
    rest, _ = drop_class(mixed, "reasoning")
    assert capacity_bound(rest.requests, n, H100)["rate"] > 1.2 * one["rate"]  # reasoning: most of the decode work


def test_serving_the_cheapest_share_gives_up_the_long_streams(mixed):
    rest, gone = drop_costliest(mixed, 0.1, H100)
    kept = {r.rid for r in rest.requests}
    assert gone >= 0.1 * len(mixed.requests) and gone == len(mixed.requests) - len(kept)
    assert all(not r.after_rid or r.after_rid in kept for r in rest.requests)
    longest = max(mixed.requests, key=lambda r: r.output_tokens)
    assert longest.rid not in kept
    n = arrivals(mixed.requests)
    assert capacity_bound(rest.requests, n, H100)["rate"] > capacity_bound(mixed.requests, n, H100)["rate"]
