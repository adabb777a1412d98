"""Greedy tree verification is lossless: speculative greedy generation through the whole
pipeline (beam-search trees -> AdaServe selection -> sub-tree -> verify) equals plain greedy
decoding token for token."""

from __future__ import annotations

import random

import pytest
import torch

from sglang_slo.spec.select import select_trees
from sglang_slo.spec.table_lm import TableLM
from sglang_slo.spec.tree import build_trees, sample_trees
from sglang_slo.spec.verify import greedy_verify, greedy_verify_batch, verify, verify_batch

V = 16
TARGET = TableLM.random(V, seed=11)
DRAFT = TARGET.perturbed(noise=1.5, seed=12)


def speculative_greedy(prompts: list[list[int]], n_tokens: int, seed: int):
    """Generate n_tokens per prompt as a batch; random depth/width/A_i/budget each iteration.
    Returns (outputs, iterations, accepted draft tokens)."""
    rng = random.Random(seed)
    seqs = [list(p) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    iterations = accepted = 0
    while True:
        active = [i for i in range(len(prompts)) if len(out[i]) < n_tokens]
        if not active:  # the last iteration may overshoot n_tokens: trim
            return [o[:n_tokens] for o in out], iterations, accepted
        iterations += 1
        ctx = [seqs[i] for i in active]
        depths = [rng.randint(0, 5) for _ in active]
        widths = [rng.randint(1, 3) for _ in active]
        trees = build_trees(DRAFT.draft_step(ctx), torch.tensor([s[-1] for s in ctx]), depths, widths)
        cands = [t.candidates(min_tokens=rng.uniform(1.0, 4.0), tree_cap=rng.randint(1, 12)) for t in trees]
        budget = rng.randint(len(active), sum(t.num_nodes for t in trees))
        sel = select_trees(cands, budget, slo_order=rng.choice(["fewest_tokens", "input"]))
        subs = [t.subtree(nodes) for t, nodes in zip(trees, sel.nodes)]
        logits = [TARGET.tree_logits(s, c) for s, c in zip(subs, ctx)]
        if iterations % 2:
            results = greedy_verify_batch(subs, torch.cat(logits))
        else:
            results = [greedy_verify(s, lg) for s, lg in zip(subs, logits)]
        for i, res in zip(active, results):
            assert len(res.tokens) == res.accepted + 1
            seqs[i] += res.tokens
            out[i] += res.tokens
            accepted += res.accepted


@pytest.mark.parametrize("seed", [0, 1])
def test_speculative_greedy_equals_greedy(seed):
    rng = random.Random(100 + seed)
    prompts = [[rng.randrange(V) for _ in range(rng.randint(2, 6))] for _ in range(30)]
    n_tokens = 24
    out, iterations, accepted = speculative_greedy(prompts, n_tokens, seed)
    for prompt, got in zip(prompts, out):
        assert got == TARGET.greedy_generate(prompt, n_tokens)
    # Not vacuous: the drafts were accepted often (else equality would be trivial).
    assert accepted > 0.15 * len(prompts) * n_tokens


def test_greedy_verify_walk_and_stats():
    prompt = [3, 7]
    tree = build_trees(DRAFT.draft_step([prompt]), torch.tensor([7]), depth=4, width=2)[0]
    logits = TARGET.tree_logits(tree, prompt)
    res = greedy_verify(tree, logits)
    expect = TARGET.greedy_generate(prompt, res.accepted + 1)
    assert res.tokens == expect
    # Accepted nodes form a path from the root with the expected tokens.
    pars = tree.parents.tolist()
    assert all(pars[v] == u for u, v in zip([0] + res.nodes, res.nodes))
    assert [int(tree.tokens[v]) for v in res.nodes] == expect[:-1]
    assert res.verified == tree.num_nodes - 1 and res.depth == 4
    if res.nodes:
        probs = [float(tree.draft_logprob[v].exp()) for v in res.nodes]
        assert res.draft_conf == pytest.approx(sum(probs) / len(probs), rel=1e-5)
    # verify() and verify_batch() dispatch temperature 0 to the same rule.
    assert verify(tree, logits).tokens == res.tokens
    assert verify_batch([tree, tree], torch.cat([logits, logits]), [0.0, 0.0], [1.0, 1.0])[1].tokens == res.tokens


def test_root_only_tree_commits_one_greedy_token():
    prompt = [1, 2]
    tree = build_trees(DRAFT.draft_step([prompt]), torch.tensor([2]), depth=0, width=1)[0]
    res = greedy_verify(tree, TARGET.tree_logits(tree, prompt))
    assert res.nodes == [] and res.tokens == TARGET.greedy_generate(prompt, 1)
    assert res.verified == 0 and res.draft_conf == 0.0


def test_greedy_on_sampled_trees_is_also_exact():
    rng = random.Random(5)
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        prompt = [rng.randrange(V) for _ in range(3)]
        tree = sample_trees(DRAFT.draft_step([prompt]), torch.tensor([prompt[-1]]), [3, 2], generator=g)[0]
        res = greedy_verify(tree, TARGET.tree_logits(tree, prompt))
        assert res.tokens == TARGET.greedy_generate(prompt, len(res.tokens))


def test_bad_logits_shape_is_a_clear_error():
    tree = build_trees(DRAFT.draft_step([[1, 2]]), torch.tensor([2]), depth=2, width=2)[0]
    with pytest.raises(ValueError, match="one row per tree node"):
        greedy_verify(tree, torch.zeros(3, V))
    with pytest.raises(ValueError, match="vocab"):
        greedy_verify_batch([tree], torch.zeros(4, V))
    with pytest.raises(ValueError, match="temperature"):
        verify(tree, torch.zeros(5, V), temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        verify(tree, torch.zeros(5, V), temperature=1.0, top_p=0.0)
