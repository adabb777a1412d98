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
    width: int
    """Nodes per level; node v >= 1 sits at level (v-1)//width + 1 with rank (v-1)%width + 1."""
    est: list[float]
    """[depth] the draft's conditional probability of each level's spine token."""


def build_tree(alphas: list[float], depth: int, width: int, min_tokens: float, tree_cap: int,
               sigma: float, rng: random.Random) -> DraftTree:
    path, parent, est = [1.0], [-1], []
    spine, spine_f, last = 0, 1.0, len(alphas) - 1
    gauss = rng.gauss
    for k in range(depth):
        a = alphas[k if k < last else last]
        e = a + gauss(0.0, sigma) if sigma > 0 else a
        e = _P_MIN if e < _P_MIN else _P_MAX if e > _P_MAX else e
        est.append(e)
        f = spine_f * e
        path.append(f)
        for _ in range(width - 1):  # alternatives: rank j has f(spine_{k-1}) * e (1-e)^(j-1)
            f *= 1.0 - e
            path.append(f)
        parent.extend([spine] * width)
        spine, spine_f = 1 + k * width, spine_f * e
    return DraftTree(TreeCandidates(path, parent, min_tokens, max(1, tree_cap)), width, est)


def verify(tree: DraftTree, selected: list[int], alphas: list[float], rng: random.Random) -> tuple[int, int, float]:
    """Sample the target's verdict on the selected nodes.

    Returns (accepted draft tokens, depth of the deepest selected node, mean draft
    probability along the deepest selected spine path)."""
    w = tree.width
    chosen = set(selected)
    max_depth = max(((v - 1) // w + 1 for v in selected if v), default=0)
    accepted, last = 0, len(alphas) - 1
    for k in range(1, max_depth + 1):
        a = alphas[k - 1 if k - 1 < last else last]
        u, j, q = rng.random(), 1, a
        while u >= q and j < 64:  # rank of the target's token among the draft's candidates
            u -= q
            j += 1
            q = a * (1.0 - a) ** (j - 1)
        if u >= q or j > w or 1 + (k - 1) * w + (j - 1) not in chosen:
            break
        accepted += 1
        if j > 1:  # an alternative is a leaf: nothing below it was drafted
            break
    spine = [tree.est[(v - 1) // w] for v in selected if v and (v - 1) % w == 0]
    conf = sum(spine) / len(spine) if spine else 0.0
    return accepted, max_depth, conf
