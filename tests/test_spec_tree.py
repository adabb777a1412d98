"""Draft-tree construction (beam search, i.i.d. sampling), sub-trees and tree-attention inputs."""

from __future__ import annotations

import math
import random

import pytest
import torch

from sglang_slo.spec.table_lm import TableLM
from sglang_slo.spec.tree import (
    DraftTree,
    ancestor_mask,
    build_trees,
    sample_trees,
    tree_attention_mask,
    tree_positions,
)

V = 12
TARGET = TableLM.random(V, seed=1)
DRAFT = TARGET.perturbed(noise=1.0, seed=2)


def draft_logprob(prompt: list[int], path: list[int]) -> torch.Tensor:
    """[V] draft log-probs after prompt + path (path excludes the root)."""
    seq = list(prompt) + path
    return torch.log_softmax(DRAFT.table[seq[-2], seq[-1]], -1)


def brute_beam(prompt: list[int], depth: int, width: int) -> dict[tuple[int, ...], float]:
    """Reference beam search: {draft path (tokens after the root): path log-prob}."""
    kept: dict[tuple[int, ...], float] = {}
    frontier = [((), 0.0)]
    for _ in range(depth):
        children = []
        for path, lp in frontier:
            logp = draft_logprob(prompt, list(path))
            children += [(path + (t,), lp + float(logp[t])) for t in range(V)]
        children.sort(key=lambda c: -c[1])
        frontier = children[:width]
        kept.update(frontier)
    return kept


def tree_paths(tree: DraftTree) -> dict[tuple[int, ...], float]:
    toks, pars = tree.tokens.tolist(), tree.parents.tolist()
    out = {}
    for v in range(1, len(toks)):
        path, u = [], v
        while u > 0:
            path.append(toks[u])
            u = pars[u]
        out[tuple(path[::-1])] = float(tree.path_logprob[v])
    return out


def check_structure(tree: DraftTree) -> None:
    h = tree.host()  # the cached host copy agrees with the tensors
    assert h.tokens == tree.tokens.tolist() and h.parents == tree.parents.tolist()
    assert h.depth == tree.depth.tolist()
    assert h.path_logprob == pytest.approx(tree.path_logprob.tolist())
    assert h.draft_logprob == pytest.approx(tree.draft_logprob.tolist())
    pars = tree.parents.tolist()
    assert pars[0] == -1 and all(0 <= pars[v] < v for v in range(1, len(pars)))
    depth = tree.depth.tolist()
    assert depth[0] == 0 and all(depth[v] == depth[pars[v]] + 1 for v in range(1, len(pars)))
    plp, dlp = tree.path_logprob.tolist(), tree.draft_logprob.tolist()
    assert plp[0] == 0.0
    for v in range(1, len(pars)):
        assert plp[v] == pytest.approx(plp[pars[v]] + dlp[v], abs=1e-5)
        assert dlp[v] <= 1e-6


def test_beam_search_matches_reference():
    rng = random.Random(0)
    prompts = [[rng.randrange(V) for _ in range(3)] for _ in range(6)]
    depths = [0, 1, 2, 3, 4, 3]
    widths = [2, 1, 3, 2, 1, 4]
    roots = torch.tensor([p[-1] for p in prompts])
    trees = build_trees(DRAFT.draft_step(prompts), roots, depths, widths)
    for prompt, d, w, tree in zip(prompts, depths, widths, trees):
        check_structure(tree)
        assert int(tree.tokens[0]) == prompt[-1]
        assert tree.num_nodes == 1 + d * w
        ref = brute_beam(prompt, d, w)
        got = tree_paths(tree)
        assert got.keys() == ref.keys()
        for path, lp in ref.items():
            assert got[path] == pytest.approx(lp, abs=1e-4)


@pytest.mark.parametrize("seed", range(6))
def test_beam_search_random_shapes(seed):
    rng = random.Random(seed)
    prompts = [[rng.randrange(V) for _ in range(2)] for _ in range(rng.randint(1, 5))]
    depths = [rng.randint(0, 4) for _ in prompts]
    widths = [rng.randint(1, 4) for _ in prompts]
    trees = build_trees(DRAFT.draft_step(prompts), torch.tensor([p[-1] for p in prompts]), depths, widths)
    for prompt, d, w, tree in zip(prompts, depths, widths, trees):
        check_structure(tree)
        ref = brute_beam(prompt, d, w)
        got = tree_paths(tree)
        assert got.keys() == ref.keys()
        assert all(got[k] == pytest.approx(ref[k], abs=1e-4) for k in ref)


def test_width_larger_than_vocab_and_bad_callbacks():
    tiny = TableLM.random(3, seed=5)
    prompts = [[0, 1]]
    tree = build_trees(tiny.draft_step(prompts), torch.tensor([1]), depth=2, width=5)[0]
    check_structure(tree)
    assert tree.num_nodes == 1 + 3 + 5  # level 1 has only |V| = 3 children
    with pytest.raises(ValueError, match="log-probs"):
        build_trees(lambda f: torch.zeros(f.tokens.numel() + 1, 3), torch.tensor([1]), 2, 2)
    with pytest.raises(ValueError, match="width"):
        build_trees(tiny.draft_step(prompts), torch.tensor([1]), 2, 0)
    with pytest.raises(ValueError, match="depth"):
        build_trees(tiny.draft_step(prompts), torch.tensor([1]), [1, 2], 1)


def test_frontier_paths_give_each_node_its_path():
    prompts = [[3, 4], [5, 6]]
    seen = []

    def step(f):
        for r, path, d in zip(f.request.tolist(), f.paths(), f.depth.tolist()):
            assert path[0] == prompts[r][-1] and len(path) == d + 1
            seen.append(path)
        return DRAFT.draft_step(prompts)(f)

    trees = build_trees(step, torch.tensor([4, 6]), depth=3, width=2)
    assert len(seen) == 2 * (1 + 2 + 2)  # roots, then 2 frontier nodes per level
    assert all(t.num_nodes == 7 for t in trees)


def test_sample_trees_shape_and_distributions():
    prompts = [[1, 2], [3, 4], [5, 6]]
    g = torch.Generator().manual_seed(0)
    trees = sample_trees(DRAFT.draft_step(prompts), torch.tensor([2, 4, 6]), [2, 3], generator=g)
    for prompt, tree in zip(prompts, trees):
        check_structure(tree)
        assert tree.num_nodes == 1 + 2 + 6
        assert tree.depth.tolist() == [0, 1, 1] + [2] * 6
        assert tree.parents.tolist() == [-1, 0, 0, 1, 1, 1, 2, 2, 2]
        q_root = draft_logprob(prompt, []).exp()
        assert torch.allclose(tree.child_dist[0], q_root, atol=1e-6)
        for v in (1, 2):
            q = draft_logprob(prompt, [int(tree.tokens[v])]).exp()
            assert torch.allclose(tree.child_dist[v], q, atol=1e-6)
            assert float(tree.draft_logprob[v]) == pytest.approx(math.log(float(q_root[tree.tokens[v]])), abs=1e-5)
        assert float(tree.child_dist[3:].abs().sum()) == 0.0  # leaves were not expanded


def test_subtree_renumbers_and_checks():
    prompts = [[1, 2]]
    tree = build_trees(DRAFT.draft_step(prompts), torch.tensor([2]), depth=3, width=2)[0]
    pars = tree.parents.tolist()
    leaf = max(range(tree.num_nodes), key=lambda v: int(tree.depth[v]))
    chain = [leaf]
    while chain[-1] != 0:
        chain.append(pars[chain[-1]])
    keep = chain[::-1]
    sub = tree.subtree(keep)
    check_structure(sub)
    assert sub.parents.tolist() == [-1, 0, 1, 2]
    assert sub.tokens.tolist() == [int(tree.tokens[v]) for v in keep]
    assert sub.path_logprob.tolist() == [float(tree.path_logprob[v]) for v in keep]
    cand = tree.candidates(min_tokens=2.0, tree_cap=5)
    assert cand.parent == pars and cand.path_prob[0] == 1.0 and cand.tree_cap == 5
    with pytest.raises(ValueError, match="root"):
        tree.subtree([1])
    with pytest.raises(ValueError, match="parent"):
        tree.subtree([0, keep[2]])
    with pytest.raises(ValueError, match="range"):
        tree.subtree([0, 99])


def test_sampling_info_survives_only_when_asked():
    g = torch.Generator().manual_seed(0)
    tree = sample_trees(DRAFT.draft_step([[1, 2]]), torch.tensor([2]), [1, 1, 1], generator=g)[0]
    assert tree.subtree([0, 1]).child_dist is None
    assert tree.subtree([0, 1], keep_sampling=True).child_dist.shape == (2, V)


def brute_ancestors(parents: list[int]) -> list[list[bool]]:
    n = len(parents)
    out = [[False] * n for _ in range(n)]
    for i in range(n):
        u = i
        while u >= 0:
            out[i][u] = True
            u = parents[u]
    return out


@pytest.mark.parametrize("seed", range(20))
def test_ancestor_mask_and_positions(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 30)
    parents = [-1] + [rng.randrange(v) for v in range(1, n)]
    depth = [0] * n
    for v in range(1, n):
        depth[v] = depth[parents[v]] + 1
    tree = DraftTree(tokens=torch.arange(n), parents=torch.tensor(parents), depth=torch.tensor(depth),
                     draft_logprob=torch.zeros(n), path_logprob=torch.zeros(n))
    assert ancestor_mask(tree).tolist() == brute_ancestors(parents)
    assert tree_positions(tree, 17).tolist() == [17 + d for d in depth]
    full = tree_attention_mask(tree, 5)
    assert full.shape == (n, 5 + n) and bool(full[:, :5].all())
    assert full[:, 5:].tolist() == brute_ancestors(parents)
