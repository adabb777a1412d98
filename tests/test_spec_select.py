"""AdaServe selection and SpecServe chain trimming: invariants on random instances and
comparison with brute-force optima on tiny ones."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings, strategies as st

from sglang_slo.spec.select import (
    SLO_ORDERS,
    TreeCandidates,
    chain_expected_tokens,
    graph_size_below,
    select_trees,
    trim_chains,
)

EPS = 1e-9


@st.composite
def candidate_trees(draw, max_nodes: int = 7) -> TreeCandidates:
    """A random candidate tree with f(child) = f(parent) * p, p in (0, 1]."""
    n = draw(st.integers(1, max_nodes))
    parent, f = [-1], [1.0]
    for v in range(1, n):
        p = draw(st.integers(0, v - 1))
        q = draw(st.floats(0.01, 1.0))
        parent.append(p)
        f.append(f[p] * q)
    return TreeCandidates(path_prob=f, parent=parent,
                          min_tokens=draw(st.floats(0.5, 5.0)),
                          tree_cap=draw(st.integers(1, max_nodes + 1)))


@st.composite
def instances(draw, max_requests: int = 3, max_nodes: int = 7):
    reqs = draw(st.lists(candidate_trees(max_nodes), min_size=1, max_size=max_requests))
    total = sum(len(r.path_prob) for r in reqs)
    budget = draw(st.integers(len(reqs), total + 2))
    return reqs, budget


def depth_of(req: TreeCandidates) -> list[int]:
    d = [0] * len(req.parent)
    for v in range(1, len(d)):
        d[v] = d[req.parent[v]] + 1
    return d


def best_by_size(req: TreeCandidates) -> dict[int, float]:
    """Brute force: max sum f (root = 1) over connected subtrees containing the root, by size."""
    n = len(req.parent)
    best: dict[int, float] = {}
    for mask in range(1 << (n - 1)):
        nodes = [0] + [v for v in range(1, n) if mask >> (v - 1) & 1]
        chosen = set(nodes)
        if any(req.parent[v] not in chosen for v in nodes[1:]):
            continue
        k = len(nodes)
        if k > req.tree_cap:
            continue
        s = 1.0 + sum(req.path_prob[v] for v in nodes[1:])
        best[k] = max(best.get(k, 0.0), s)
    return best


def assert_valid(reqs, budget, sel):
    assert sel.total_tokens <= budget
    for req, nodes, exp in zip(reqs, sel.nodes, sel.expected_tokens):
        assert nodes[0] == 0, "root first"
        assert len(set(nodes)) == len(nodes), "no duplicates"
        assert len(nodes) <= req.tree_cap
        seen = set()
        for v in nodes:
            assert v == 0 or req.parent[v] in seen, "parent selected before child"
            seen.add(v)
        assert exp == pytest.approx(1.0 + sum(req.path_prob[v] for v in nodes[1:]))


@settings(max_examples=300, deadline=None)
@given(instances(), st.sampled_from(SLO_ORDERS))
def test_selection_invariants(inst, order):
    reqs, budget = inst
    sel = select_trees(reqs, budget, slo_order=order)
    assert_valid(reqs, budget, sel)
    # Budget is used up unless every tree is full (cap or candidates exhausted).
    full = all(len(n) == min(r.tree_cap, len(r.parent)) for r, n in zip(reqs, sel.nodes))
    assert sel.total_tokens == budget or full
    for req, target in zip(reqs, sel.target):
        assert target == pytest.approx(min(req.min_tokens, max(depth_of(req)) + 1))


@settings(max_examples=300, deadline=None)
@given(instances())
def test_selection_matches_brute_force_optimum(inst):
    """AdaServe Algorithm 1 is optimal for known f: when every A_cap can be met within the
    budget, the selection meets them all and maximizes sum f; when not, the default order
    meets as many targets as any selection can."""
    reqs, budget = inst
    sel = select_trees(reqs, budget)
    assert_valid(reqs, budget, sel)
    tables = [best_by_size(r) for r in reqs]
    targets = sel.target
    best_feasible, best_count = None, 0
    for sizes in itertools.product(*[sorted(t) for t in tables]):
        if sum(sizes) > budget:
            continue
        values = [t[k] for t, k in zip(tables, sizes)]
        met = [v >= tg - EPS for v, tg in zip(values, targets)]
        best_count = max(best_count, sum(met))
        if all(met):
            total = sum(values)
            best_feasible = total if best_feasible is None else max(best_feasible, total)
    assert sum(sel.reached) == best_count
    if best_feasible is not None:
        assert all(sel.reached)
        assert sum(sel.expected_tokens) == pytest.approx(best_feasible)


@settings(max_examples=200, deadline=None)
@given(instances(max_requests=5, max_nodes=9))
def test_slo_step_reaches_target_when_budget_allows(inst):
    reqs, budget = inst
    tables = [best_by_size(r) for r in reqs]
    sel = select_trees(reqs, budget)
    # Fewest nodes each request needs to meet its target (None: unreachable within cap).
    needs = [min((k for k, v in t.items() if v >= tg - EPS), default=None)
             for t, tg in zip(tables, sel.target)]
    if all(k is not None for k in needs) and sum(needs) <= budget:
        assert all(sel.reached)
        assert sel.slo_tokens == needs, "SLO step spends exactly the minimal tokens"
    for ok, k, got in zip(sel.reached, needs, sel.expected_tokens):
        if k is None:
            assert not ok


def test_throughput_fill_is_global_top_f():
    """No SLO pressure (A = 1): the selection is the budget's worth of globally best nodes."""
    a = TreeCandidates([1.0, 0.9, 0.8, 0.1], [-1, 0, 1, 0])
    b = TreeCandidates([1.0, 0.85, 0.05], [-1, 0, 1])
    sel = select_trees([a, b], budget=5)
    assert sel.nodes == [[0, 1, 2], [0, 1]]
    assert sel.slo_tokens == [1, 1]


def test_slo_step_serves_behind_request_before_fill():
    # a's nodes have higher f, but b needs 2.2 tokens: the SLO step must give b two nodes.
    a = TreeCandidates([1.0, 0.9, 0.8], [-1, 0, 1], min_tokens=1.0)
    b = TreeCandidates([1.0, 0.7, 0.5], [-1, 0, 1], min_tokens=2.2)
    sel = select_trees([a, b], budget=4)
    assert sel.nodes == [[0], [0, 1, 2]]
    assert sel.reached == [True, True]


def test_slo_orders_differ_when_budget_is_short():
    # r0 needs 3 extra nodes, r1 and r2 one each; budget covers roots + 3.
    deep = TreeCandidates([1.0, 0.9, 0.8, 0.7], [-1, 0, 1, 2], min_tokens=3.3)
    easy = TreeCandidates([1.0, 0.6], [-1, 0], min_tokens=1.5)
    reqs = [deep, easy, easy]
    fewest = select_trees(reqs, budget=6, slo_order="fewest_tokens")
    assert fewest.reached == [False, True, True]
    behind = select_trees(reqs, budget=6, slo_order="most_behind")
    assert behind.reached == [True, False, False]
    assert select_trees(reqs, budget=6, slo_order="least_behind").reached == [False, True, True]
    assert select_trees(reqs, budget=6, slo_order="input").reached == [True, False, False]


def test_tree_cap_and_depth_cap():
    chain = TreeCandidates([1.0, 0.9, 0.8, 0.7], [-1, 0, 1, 2], min_tokens=10.0, tree_cap=2)
    sel = select_trees([chain], budget=10)
    assert sel.nodes == [[0, 1]]
    assert sel.target == [4.0]  # A_cap = min(10, depth 3 + 1)
    assert sel.reached == [False]


@pytest.mark.parametrize("bad, match", [
    (TreeCandidates([1.0, 0.5], [-1, 1]), "parent"),
    (TreeCandidates([1.0, 0.5], [0, 0]), "root"),
    (TreeCandidates([1.0, 0.5], [-1]), "equally long"),
    (TreeCandidates([1.0], [-1], tree_cap=0), "tree_cap"),
])
def test_bad_input_is_a_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        select_trees([bad], budget=4)


def test_budget_below_roots_is_an_error():
    r = TreeCandidates([1.0], [-1])
    with pytest.raises(ValueError, match="root"):
        select_trees([r, r], budget=1)
    with pytest.raises(ValueError, match="slo_order"):
        select_trees([r], budget=1, slo_order="random")


# ---------------------------------------------------------------------------------------
# Chain trimming
# ---------------------------------------------------------------------------------------

chains = st.lists(st.lists(st.floats(0.0, 1.0), max_size=5), min_size=1, max_size=4)


@settings(max_examples=300, deadline=None)
@given(chains, st.integers(0, 30))
def test_trim_chains_is_optimal_prefix_trim(conf, extra):
    budget = len(conf) + extra
    kept = trim_chains(conf, budget)
    n_drafts = sum(len(c) for c in conf)
    assert all(0 <= k <= len(c) for k, c in zip(kept, conf))
    assert sum(kept) + len(conf) == min(budget, n_drafts + len(conf))
    # Brute force: no other prefix choice with the same cost has a higher expected yield.
    got = sum(chain_expected_tokens(c, k) for c, k in zip(conf, kept))
    best = max(
        sum(chain_expected_tokens(c, k) for c, k in zip(conf, ks))
        for ks in itertools.product(*[range(len(c) + 1) for c in conf])
        if sum(ks) == sum(kept)
    )
    assert got == pytest.approx(best)


def test_trim_chains_drops_lowest_cumulative_confidence():
    # cumulative: a = [.9, .45, .36], b = [.5, .45]; drop .36, then the tied .45 of the
    # later request (b).
    assert trim_chains([[0.9, 0.5, 0.8], [0.5, 0.9]], budget=2 + 3) == [2, 1]
    assert trim_chains([[0.9, 0.5, 0.8], [0.5, 0.9]], budget=2 + 2) == [1, 1]
    assert trim_chains([[0.9, 0.5, 0.8], [0.5, 0.9]], budget=2) == [0, 0]
    assert trim_chains([[0.9], []], budget=10) == [1, 0]
    with pytest.raises(ValueError):
        trim_chains([[0.5], [0.5]], budget=1)
    with pytest.raises(ValueError, match="confidence"):
        trim_chains([[1.5]], budget=3)


def test_chain_expected_tokens_and_graph_sizes():
    assert chain_expected_tokens([0.5, 0.5], 2) == pytest.approx(1 + 0.5 + 0.25)
    assert chain_expected_tokens([0.5, 0.5], 0) == 1.0
    assert [graph_size_below(n) for n in (1, 2, 3, 5, 32, 33, 64, 65, 100)] == \
        [1, 1, 2, 4, 16, 32, 32, 64, 96]


@settings(max_examples=200, deadline=None)
@given(chains, st.integers(0, 30))
def test_trim_chains_agrees_with_tree_selection_on_chains(conf, extra):
    """Chains are width-1 trees: with no SLO pressure, AdaServe's throughput fill keeps the
    same expected tokens as SpecServe's trim (both drop the lowest cumulative confidences)."""
    budget = len(conf) + extra
    kept = trim_chains(conf, budget)
    cands = []
    for c in conf:
        f = [1.0]
        for p in c:
            f.append(f[-1] * p)
        cands.append(TreeCandidates(f, list(range(-1, len(c)))))
    sel = select_trees(cands, budget)
    assert all(n == list(range(len(n))) for n in sel.nodes)  # chains stay prefixes
    assert sum(len(n) - 1 for n in sel.nodes) == sum(kept)
    assert sum(sel.expected_tokens) == pytest.approx(
        sum(chain_expected_tokens(c, k) for c, k in zip(conf, kept)))
