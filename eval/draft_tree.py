"""A simulated request's draft tree for one iteration, and its verification against the truth.

Shape (what a beam search of depth d, width w keeps, simplified): a spine of the draft's
top-1 tokens, level 1..d, plus at every level the next w-1 ranked alternatives under the
previous spine node (leaves). Node order is level by level, spine first, so parent[v] < v.
1 + d*w nodes, like the beam's.

Truth: at level k (given the spine up to k-1 was accepted) the target's token is the draft's
rank-j candidate with probability q_j = a_k (1 - a_k)^(j-1), a_k = the request's true
conditional acceptance at position k. The draft's probabilities (what selection sees) are
noisy calibrated estimates: est_k = clip(a_k + N(0, sigma)), f(spine_k) = prod est_1..k,
f(alt_{k,j}) = f(spine_{k-1}) * est_k (1 - est_k)^(j-1).
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
    level: list[int]
    """[N] depth of each node (root 0)."""
    rank: list[int]
    """[N] 1 = spine node, j >= 2 = j-th ranked alternative (leaf)."""
    est: list[float]
    """[N] the draft's conditional probability of each node (root 1.0)."""


def build_tree(alphas: list[float], depth: int, width: int, min_tokens: float, tree_cap: int,
               sigma: float, rng: random.Random) -> DraftTree:
    path, parent, level, rank, est = [1.0], [-1], [0], [1], [1.0]
    spine = 0
    for k in range(1, depth + 1):
        a = alphas[min(k - 1, len(alphas) - 1)]
        e = min(_P_MAX, max(_P_MIN, a + rng.gauss(0.0, sigma))) if sigma > 0 else a
        base = path[spine]
        new_spine = len(path)
        for j in range(1, width + 1):
            path.append(base * e * (1.0 - e) ** (j - 1))
            parent.append(spine)
            level.append(k)
            rank.append(j)
            est.append(e * (1.0 - e) ** (j - 1) if j > 1 else e)
        spine = new_spine
    return DraftTree(TreeCandidates(path, parent, min_tokens, max(1, tree_cap)), level, rank, est)


def verify(tree: DraftTree, selected: list[int], alphas: list[float], rng: random.Random) -> tuple[int, int, float]:
    """Sample the target's verdict on the selected nodes.

    Returns (accepted draft tokens, depth of the deepest selected node, mean draft
    probability along the deepest selected spine path)."""
    chosen = set(selected)
    by_level: dict[int, dict[int, int]] = {}
    for v in selected:
        if v:
            by_level.setdefault(tree.level[v], {})[tree.rank[v]] = v
    max_depth = max(by_level, default=0)
    accepted = 0
    for k in range(1, max_depth + 1):
        a = alphas[min(k - 1, len(alphas) - 1)]
        u, j, q = rng.random(), 1, a
        while u >= q and j < 64:  # rank of the target's token among the draft's candidates
            u -= q
            j += 1
            q = a * (1.0 - a) ** (j - 1)
        node = by_level.get(k, {}).get(j) if u < q else None
        if node is None or node not in chosen:
            break
        accepted += 1
        if j > 1:  # an alternative is a leaf: nothing below it was drafted
            break
    spine_est = [tree.est[v] for v in selected if v and tree.rank[v] == 1]
    conf = sum(spine_est) / len(spine_est) if spine_est else 0.0
    return accepted, max_depth, conf
