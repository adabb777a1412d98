"""Simulated draft trees: shape, and acceptance sampled from the request's true alphas."""

import random

import pytest

from eval.acceptance_regimes import expected_accept_length
from eval.draft_tree import build_tree, verify

ALPHAS = [0.8, 0.7, 0.6, 0.5]


def mean_accepted(depth, width, select=None, n=20000, seed=0):
    rng = random.Random(seed)
    total = 0
    for _ in range(n):
        t = build_tree(ALPHAS, depth, width, 1.0, 1 + depth * width, 0.05, rng)
        nodes = list(range(len(t.cand.path_prob))) if select is None else select
        total += verify(t, nodes, ALPHAS, rng)[0]
    return total / n


def test_shape_parents_and_monotone_path_probabilities():
    t = build_tree(ALPHAS, 3, 3, 2.0, 10, 0.0, random.Random(0))
    assert t.cand.parent == [-1, 0, 0, 0, 1, 1, 1, 4, 4, 4]
    f = t.cand.path_prob
    assert f[1] == pytest.approx(0.8) and f[4] == pytest.approx(0.8 * 0.7) and f[2] == pytest.approx(0.8 * 0.2)
    assert all(f[v] <= f[t.cand.parent[v]] for v in range(1, len(f)))


def test_chain_acceptance_matches_the_true_alphas():
    assert mean_accepted(4, 1) + 1 == pytest.approx(expected_accept_length(ALPHAS, 4), rel=0.02)


def test_wider_trees_accept_more_and_unselected_nodes_never_count():
    assert mean_accepted(4, 3) > mean_accepted(4, 1) + 0.05
    assert mean_accepted(4, 1, select=[0, 1]) == pytest.approx(0.8, abs=0.02)  # only level 1 verified
    assert mean_accepted(4, 1, select=[0]) == 0.0
