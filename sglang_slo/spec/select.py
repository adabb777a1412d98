"""Which draft tokens to verify this iteration: AdaServe tree selection, SpecServe chain trim.

Pure Python (no torch): the engine calls it once per iteration with this iteration's draft
probabilities, and the simulator (eval/) calls it per simulated iteration for hundreds of
requests, so it uses lists and heapq only.

Public API
----------
    TreeCandidates(path_prob: Sequence[float], parent: Sequence[int],
                   min_tokens: float = 1.0, tree_cap: int = 1 << 30)
        One request's candidate tree. Node 0 is the root (the last committed token,
        path_prob 1.0, parent -1); parent[v] < v for every other node.

    select_trees(requests: Sequence[TreeCandidates], budget: int,
                 slo_order: str = "fewest_tokens") -> Selection
        AdaServe speculate-select-verify, step "select" (papers.md §1.3-1.4).
        budget: B, total verify tokens of the iteration, every root included.
        Selection.nodes[i]: selected node indices of request i, root first, every node
        after its parent (a connected subtree containing the root).

    trim_chains(confidence: Sequence[Sequence[float]], budget: int) -> list[int]
        SpecServe confidence-prior trimming (papers.md §2.3): kept draft length per request.

    chain_expected_tokens(confidence: Sequence[float], length: int) -> float
    graph_size_below(num_tokens: int) -> int

Notation (AdaServe): f(v) = product of draft probabilities along root -> v, an estimate of
the probability that the target accepts the whole path; E[accepted + 1] = sum over the tree
of f(v) with f(root) = 1. A_i (`min_tokens`) is the expected committed tokens request i needs
this iteration to stay on its TPOT trajectory.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Sequence

__all__ = [
    "TreeCandidates",
    "Selection",
    "SLO_ORDERS",
    "select_trees",
    "greedy_order",
    "trim_chains",
    "chain_expected_tokens",
    "graph_size_below",
]

# Tolerance when comparing a running sum of f against A_cap (sums of floats).
_EPS = 1e-9

SLO_ORDERS = ("fewest_tokens", "input", "most_behind", "least_behind")
"""Orders in which the SLO step serves requests (see `select_trees`)."""


@dataclass(slots=True)
class TreeCandidates:
    """One request's candidate draft tree and its speculation parameters."""

    path_prob: Sequence[float]
    """[N] f(v): product of draft probabilities root -> v; index 0 is the root (1.0)."""
    parent: Sequence[int]
    """[N] parent node index; parent[0] = -1 and 0 <= parent[v] < v otherwise."""
    min_tokens: float = 1.0
    """A_i: expected committed tokens needed this iteration (the root counts 1.0)."""
    tree_cap: int = 1 << 30
    """Most nodes (verify tokens, root included) this request may use; >= 1."""


@dataclass(slots=True)
class Selection:
    """Result of `select_trees`; lists are indexed like the input requests."""

    nodes: list[list[int]] = field(default_factory=list)
    """Selected node indices per request: root first, every node after its parent."""
    expected_tokens: list[float] = field(default_factory=list)
    """Sum of f over the selected nodes: expected committed tokens (root = 1.0)."""
    target: list[float] = field(default_factory=list)
    """A_cap = min(A_i, depth + 1): what the SLO step aimed for."""
    reached: list[bool] = field(default_factory=list)
    """Whether expected_tokens >= A_cap."""
    slo_tokens: list[int] = field(default_factory=list)
    """Nodes (root included) given in the SLO step; the rest came from the throughput fill."""

    @property
    def total_tokens(self) -> int:
        """Verify tokens used by the whole selection (roots included)."""
        return sum(len(n) for n in self.nodes)


def greedy_order(req: TreeCandidates, index: int = 0) -> tuple[list[int], list[float], int]:
    """The order in which AdaServe adds this request's nodes, up to its tree_cap.

    Repeatedly take the highest-f node whose parent is already taken (a frontier max-heap),
    starting from the root. With f(child) <= f(parent) this is the request's global top-f
    order, and every prefix is a connected subtree. Validates the input (`index` names the
    request in error messages).
    Returns (nodes, cumulative f after each node, max depth of the candidate tree).
    """
    parent, f = req.parent, req.path_prob
    n = len(f)
    if n < 1 or len(parent) != n:
        raise ValueError(f"request {index}: path_prob and parent must be non-empty and equally long "
                         f"(got {n} and {len(parent)})")
    if parent[0] != -1:
        raise ValueError(f"request {index}: node 0 must be the root (parent -1), got {parent[0]}")
    if req.tree_cap < 1:
        raise ValueError(f"request {index}: tree_cap must be >= 1 (the root), got {req.tree_cap}")
    children: list[list[int]] = [[] for _ in range(n)]
    depth = [0] * n
    for v in range(1, n):
        p = parent[v]
        if not 0 <= p < v:
            raise ValueError(f"request {index}: parent[{v}] = {p}; need 0 <= parent[v] < v")
        children[p].append(v)
        depth[v] = depth[p] + 1
    limit = min(n, req.tree_cap)
    nodes = [0]
    cum = [1.0]  # the root counts 1.0 whatever path_prob[0] says
    total = 1.0
    heap = [(-f[c], c) for c in children[0]]
    heapq.heapify(heap)
    pop, push = heapq.heappop, heapq.heappush
    while heap and len(nodes) < limit:
        negf, v = pop(heap)
        nodes.append(v)
        total -= negf
        cum.append(total)
        for c in children[v]:
            push(heap, (-f[c], c))
    return nodes, cum, max(depth)


def select_trees(requests: Sequence[TreeCandidates], budget: int,
                 slo_order: str = "fewest_tokens") -> Selection:
    """AdaServe selection: SLO step, then throughput fill (Algorithm 1 / 2, papers.md §1.3-1.4).

    0. Every request gets its root (1 verify token): budget >= len(requests) is required.
    1. SLO step: per request, add its highest-f connected candidates until
       sum f >= A_cap = min(A_i, depth + 1), its tree_cap, or the budget is reached.
    2. Throughput step: spend what is left on the globally highest-f frontier nodes across
       requests (respecting each tree_cap).
    With known, monotone f this is optimal (AdaServe's exchange argument): step 1 spends the
    fewest tokens that meet each target, and per-request sums of top-f are concave, so the
    global greedy fill maximizes sum f.

    slo_order decides who is served first in step 1 when the budget cannot meet every
    target (when it can, the order does not matter):
      "fewest_tokens" (default): reachable targets first, then fewest tokens needed first.
          Meeting a target is all-or-nothing and each request's cost N_i is known, so
          smallest-cost-first maximizes the number of requests that meet their target
          (the classic exchange argument); this is the count the SLO attainment metric sees.
          It also subsumes the artifact's ascending-A_i order (N_i grows with A_i).
      "input": the order given (e.g. the planner's priority order).
      "most_behind": descending A_i, as the AdaServe paper states.
      "least_behind": ascending A_i, as the AdaServe artifact code does.
    """
    if slo_order not in SLO_ORDERS:
        raise ValueError(f"slo_order must be one of {SLO_ORDERS}, got {slo_order!r}")
    n_req = len(requests)
    if budget < n_req:
        raise ValueError(f"budget {budget} < {n_req} requests: every request needs its root token")

    orders: list[list[int]] = []
    cums: list[list[float]] = []
    targets: list[float] = []
    needs: list[int] = []  # nodes (root included) to reach the target, or all allowed nodes
    reachable: list[bool] = []
    for i, req in enumerate(requests):
        nodes, cum, max_depth = greedy_order(req, i)
        target = min(float(req.min_tokens), max_depth + 1.0)
        k = next((j + 1 for j, c in enumerate(cum) if c >= target - _EPS), None)
        orders.append(nodes)
        cums.append(cum)
        targets.append(target)
        reachable.append(k is not None)
        needs.append(k if k is not None else len(nodes))

    if slo_order == "fewest_tokens":
        order = sorted(range(n_req), key=lambda i: (not reachable[i], needs[i], i))
    elif slo_order == "input":
        order = list(range(n_req))
    elif slo_order == "most_behind":
        order = sorted(range(n_req), key=lambda i: (-requests[i].min_tokens, i))
    else:
        order = sorted(range(n_req), key=lambda i: (requests[i].min_tokens, i))

    # Step 0 + 1. taken[i] = prefix length of orders[i] selected so far.
    taken = [1] * n_req
    left = budget - n_req
    for i in order:
        extra = min(needs[i] - 1, left)
        taken[i] += extra
        left -= extra
    slo_tokens = list(taken)

    # Step 2: merge the requests' remaining greedy orders by f (global max-heap).
    heap = [(-requests[i].path_prob[orders[i][taken[i]]], i)
            for i in range(n_req) if taken[i] < len(orders[i])]
    heapq.heapify(heap)
    while left > 0 and heap:
        _, i = heapq.heappop(heap)
        taken[i] += 1
        left -= 1
        if taken[i] < len(orders[i]):
            heapq.heappush(heap, (-requests[i].path_prob[orders[i][taken[i]]], i))

    out = Selection()
    for i in range(n_req):
        k = taken[i]
        out.nodes.append(orders[i][:k])
        out.expected_tokens.append(cums[i][k - 1])
        out.target.append(targets[i])
        out.reached.append(cums[i][k - 1] >= targets[i] - _EPS)
        out.slo_tokens.append(slo_tokens[i])
    return out


# ----------------------------------------------------------------------------------------
# Chain mode (SpecServe / AdaSpec)
# ----------------------------------------------------------------------------------------


def chain_expected_tokens(confidence: Sequence[float], length: int) -> float:
    """E_i(k) + 1 = 1 + sum_{j<=k} prod_{l<=j} c_l: expected committed tokens of a chain
    whose first `length` draft tokens are verified (the 1 is the bonus/correction)."""
    total, cum = 1.0, 1.0
    for c in confidence[:length]:
        cum *= c
        total += cum
    return total


def trim_chains(confidence: Sequence[Sequence[float]], budget: int) -> list[int]:
    """SpecServe confidence-prior trimming: fit the batch's chains into `budget` verify tokens.

    confidence[i][j]: draft probability of request i's draft token j (per position, not
    cumulative). A chain of k drafts costs k + 1 verify tokens (its root included). While the
    batch is over budget, drop the draft token with the lowest cumulative confidence
    prod_{l<=j} c_{i,l} across the batch; cumulative confidence never rises along a chain,
    so that token is always some chain's tail and the kept drafts stay prefixes.
    Returns the kept length per request (0 = verify the root only).
    """
    n_req = len(confidence)
    if budget < n_req:
        raise ValueError(f"budget {budget} < {n_req} requests: every request needs its root token")
    cum: list[list[float]] = []
    for conf in confidence:
        row, c = [], 1.0
        for p in conf:
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"draft confidence must lie in [0, 1], got {p}")
            c *= p
            row.append(c)
        cum.append(row)
    lengths = [len(row) for row in cum]
    excess = sum(lengths) + n_req - budget
    if excess <= 0:
        return lengths
    # Min-heap of chain tails; ties drop the later position first, then the later request.
    heap = [(row[-1], -len(row), -i) for i, row in enumerate(cum) if row]
    heapq.heapify(heap)
    while excess > 0:
        _, _, neg_i = heapq.heappop(heap)
        i = -neg_i
        lengths[i] -= 1
        excess -= 1
        if lengths[i] > 0:
            heapq.heappush(heap, (cum[i][lengths[i] - 1], -lengths[i], neg_i))
    return lengths


def graph_size_below(num_tokens: int) -> int:
    """SpecServe's trim target: the next CUDA-graph batch size strictly below num_tokens
    (powers of two up to 32, then multiples of 32); 1 is the smallest."""
    if num_tokens <= 1:
        return 1
    if num_tokens <= 32:
        size = 1
        while size * 2 < num_tokens:
            size *= 2
        return size
    return max(32, (num_tokens - 1) // 32 * 32)
