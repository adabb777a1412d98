"""Pieces of `sglang-slo profile` (sglang_slo/engine/profile.py): how repeated runs of an
episode combine, how iterations are classified, and per-kind errors of a fitted model."""

from __future__ import annotations

import pytest

from sglang_slo.engine.profile import combine, error_by_kind, iteration_kind, seconds
from sidecar.cost_model import CostModel

# Rows as `episode` makes them: (prefill, verify, draft_steps, context, draft_tokens, cpu_s,
# wall_s, requests, spec_requests, tree_tokens).
PREFILL = (64, 0, 0, 64, 0, 0.004, 0.005, 1, 0, 0)
MIXED = (32, 4, 0, 300, 0, 0.006, 0.006, 5, 0, 0)
DECODE = (0, 8, 0, 800, 0, 0.003, 0.004, 8, 0, 0)
SPEC = (0, 12, 3, 400, 8, 0.007, 0.008, 4, 4, 0)
TREE = (0, 20, 3, 400, 16, 0.009, 0.009, 4, 4, 16)


def test_iteration_kinds():
    assert [iteration_kind(r) for r in (PREFILL, MIXED, DECODE, SPEC, TREE)] == [
        "prefill", "mixed", "decode", "spec", "tree"]
    assert [iteration_kind(r) for r in seconds([PREFILL, MIXED, DECODE, SPEC, TREE])] == [
        "prefill", "mixed", "decode", "spec", "tree"]  # the 9-column rows of the fit too


def test_combine_keeps_the_fastest_matching_run():
    first = [PREFILL, DECODE]
    slower = [PREFILL[:5] + (0.006, 0.007) + PREFILL[7:], DECODE[:5] + (0.002, 0.003) + DECODE[7:]]
    other = [PREFILL[:5] + (0.001, 0.001) + PREFILL[7:], SPEC]  # second row differs: not the same iteration
    short = [PREFILL[:5] + (0.0005, 0.0005) + PREFILL[7:]]     # another length: skipped entirely
    got = combine([first, slower, other, short])
    assert got[0][5:7] == (0.001, 0.001) and got[1][5:7] == (0.002, 0.003)
    assert got[0][:5] == PREFILL[:5] and got[1][7:] == DECODE[7:]
    mean = combine([first, slower], stat="mean")
    assert mean[0][5] == pytest.approx(0.005) and mean[1][6] == pytest.approx(0.0035)


def test_error_by_kind_reports_signed_bias():
    rows = seconds([PREFILL, DECODE, DECODE[:5] + (0.006,) + DECODE[6:]])
    exact = CostModel(base_s=0.004)  # 4 ms for everything
    got = error_by_kind(exact, rows)
    assert set(got) == {"prefill", "decode"} and got["prefill"] == {"iterations": 1, "bias": 0.0, "mape": 0.0}
    # decode: measured 3 ms and 6 ms -> errors +1/3 and -1/3
    assert got["decode"]["iterations"] == 2 and got["decode"]["bias"] == pytest.approx(0.0, abs=1e-4)
    assert got["decode"]["mape"] == pytest.approx(1 / 3, abs=1e-4)
