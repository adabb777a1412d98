"""A simulated request's draft tree for one iteration, and its verification against the truth.

Shape: what a beam search of depth d and width w keeps (AdaServe/EAGLE-2 style). Level 1 is
the root's top-w children; every later level keeps the w highest path probabilities among
the top-w children of the previous level's w nodes. 1 + d*w nodes, level by level, so
parent[v] < v.

Truth: below an accepted node at level k-1, the target's token is the draft's rank-j child
with probability q_j = a_k (1 - a_k)^(j-1), a_k = the request's true conditional acceptance
at position k; the walk continues while that child is in the tree and selected. What the
draft reports (and selection sees) are noisy calibrated estimates: e_k = clip(a_k + N(0,
sigma)) per level, f(child_j) = f(parent) * e_k (1 - e_k)^(j-1).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from sglang_slo.spec.select import TreeCandidates

_P_MIN, _P_MAX = 0.01, 0.99


@dataclass(slots=True)
class DraftTree:
    cand: TreeCandidates
    """What selection sees: path probabilities, parents, A_i, tree cap."""
    rank: list[int]
    """[N] rank of each node among its parent's draft candidates (1 = top-1; root 0)."""
    level: list[int]
    """[N] depth of each node (root 0)."""


def build_tree(alphas: list[float], depth: int, width: int, min_tokens: float, tree_cap: int,
               sigma: float, rng: random.Random) -> DraftTree:
    path, parent, rank, level = [1.0], [-1], [0], [0]
    beam = [0]
    last = len(alphas) - 1
    for k in range(1, depth + 1):
        a = alphas[k - 1 if k - 1 < last else last]
        e = a + rng.gauss(0.0, sigma) if sigma > 0 else a
        e = _P_MIN if e < _P_MIN else _P_MAX if e > _P_MAX else e
        if width == 1:  # a chain: the rank-1 child of the last node
            path.append(path[-1] * e)
            parent.append(len(path) - 2)
            rank.append(1)
            level.append(k)
            continue
        cands = []  # (-f, parent, rank): the top-w children of every beam node
        for p in beam:
            f = path[p] * e
            for j in range(1, width + 1):
                cands.append((-f, p, j))
                f *= 1.0 - e
        cands.sort()
        beam = []
        for negf, p, j in cands[:width]:
            beam.append(len(path))
            path.append(-negf)
            parent.append(p)
            rank.append(j)
            level.append(k)
    return DraftTree(TreeCandidates(path, parent, min_tokens, max(1, tree_cap)), rank, level)


def verify(tree: DraftTree, selected: list[int], alphas: list[float], rng: random.Random) -> tuple[int, int, float]:
    """Sample the target's verdict on the selected nodes.

    Returns (accepted draft tokens, depth of the deepest selected node, mean draft
    probability along the path to the deepest, most probable selected node)."""
    parent, rank, level, f = tree.cand.parent, tree.rank, tree.level, tree.cand.path_prob
    child = {(parent[v], rank[v]): v for v in selected if v}
    if not child:
        return 0, 0, 0.0
    accepted, node, last = 0, 0, len(alphas) - 1
    while True:
        a = alphas[accepted if accepted < last else last]
        u, j, q = rng.random(), 1, a
        while u >= q and j < 64:  # rank of the target's token among the draft's candidates
            u -= q
            j += 1
            q = a * (1.0 - a) ** (j - 1)
        nxt = child.get((node, j)) if u < q else None
        if nxt is None:
            break
        accepted += 1
        node = nxt
    deepest = max((v for v in selected if v), key=lambda v: (level[v], f[v]))
    conds = []
    while deepest > 0:
        conds.append(f[deepest] / f[parent[deepest]])
        deepest = parent[deepest]
    return accepted, len(conds), sum(conds) / len(conds)
