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


def test_beam_shape_parents_and_monotone_path_probabilities():
    t = build_tree(ALPHAS, 3, 3, 2.0, 10, 0.0, random.Random(0))
    # level 1: the root's top-3; level 2: top-3 of {0.56, 0.168, 0.0504 | 0.112, ... | ...};
    # level 3: top-3 of the children of 0.56, 0.168, 0.112 -> 0.336, 0.1344, 0.1008
    assert t.cand.parent == [-1, 0, 0, 0, 1, 1, 2, 4, 4, 5]
    assert t.rank == [0, 1, 2, 3, 1, 2, 1, 1, 2, 1]
    f = t.cand.path_prob
    assert f == pytest.approx([1, 0.8, 0.16, 0.032, 0.56, 0.168, 0.112, 0.336, 0.1344, 0.1008])
    assert all(f[v] <= f[t.cand.parent[v]] for v in range(1, len(f)))


def test_chain_acceptance_matches_the_true_alphas():
    assert mean_accepted(4, 1) + 1 == pytest.approx(expected_accept_length(ALPHAS, 4), rel=0.02)


def test_an_accepted_alternative_continues_below():
    # level 1 is always rejected by rank 1 (alpha ~ 0) -> only paths through alternatives count
    alphas = [0.02, 0.9, 0.9]
    rng = random.Random(1)
    deep = 0
    for _ in range(2000):
        t = build_tree(alphas, 3, 3, 1.0, 10, 0.0, rng)
        acc, depth, conf = verify(t, list(range(10)), alphas, rng)
        deep += acc >= 2
        assert depth == 3 and 0 < conf < 1
    assert deep > 10


def test_wider_trees_accept_more_and_unselected_nodes_never_count():
    assert mean_accepted(4, 3) > mean_accepted(4, 1) + 0.05
    assert mean_accepted(4, 1, select=[0, 1]) == pytest.approx(0.8, abs=0.02)  # only level 1 verified
    assert mean_accepted(4, 1, select=[0]) == 0.0
