"""Stochastic verification is lossless: over many seeded trials the first committed token and
the first two tokens follow the target distribution (after temperature and top-p), for
beam-search trees, selected sub-trees, sampled chains and trees, and confidence-trimmed chains.
Chi-square tests with fixed seeds (deterministic); negative controls show the test has power."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from sglang_slo.spec.select import select_trees, trim_chains
from sglang_slo.spec.table_lm import TableLM
from sglang_slo.spec.tree import build_trees, sample_trees
from sglang_slo.spec.verify import (
    logits_to_probs,
    sampling_verify,
    speculative_sampling_verify,
    verify,
    verify_batch,
)

V = 8
TARGET = TableLM.random(V, seed=21, scale=1.5)
DRAFT = TARGET.perturbed(noise=1.0, seed=22)
PROMPT = [2, 5]
TRIALS = 3000
P_MIN = 1e-3  # fixed seeds: the outcome is deterministic; a lossless rule passes with margin


def target_probs(ctx: list[int], temperature: float, top_p: float) -> torch.Tensor:
    return logits_to_probs(TARGET.table[ctx[-2], ctx[-1]].unsqueeze(0), temperature, top_p)[0]


def make_trees(kind: str, ctxs: list[list[int]], gen: torch.Generator):
    """Trees for a batch of contexts and whether the p/q rule may use them."""
    step = DRAFT.draft_step(ctxs)
    roots = torch.tensor([c[-1] for c in ctxs])
    if kind == "beam":
        return build_trees(step, roots, depth=3, width=2)
    if kind == "beam_selected":
        trees = build_trees(step, roots, depth=4, width=3)
        cands = [t.candidates(min_tokens=2.0, tree_cap=5) for t in trees]
        sel = select_trees(cands, budget=4 * len(trees))
        return [t.subtree(n) for t, n in zip(trees, sel.nodes)]
    if kind == "chain":
        return sample_trees(step, roots, [1, 1, 1], generator=gen)
    if kind == "sampled_tree":
        return sample_trees(step, roots, [3, 2], generator=gen)
    if kind in ("chain_trimmed", "chain_trimmed_pq_LOSSY"):
        chains = sample_trees(step, roots, [1, 1, 1, 1], generator=gen)
        conf = [t.draft_logprob[1:].exp().tolist() for t in chains]
        kept = trim_chains(conf, budget=3 * len(chains))  # drops the least confident tails
        lossy = kind.endswith("LOSSY")  # wrongly keeps q after a value-dependent trim
        return [t.subtree(range(k + 1), keep_sampling=lossy) for t, k in zip(chains, kept)]
    raise AssertionError(kind)


def run(kind: str, temperature: float, top_p: float, n_tokens: int, seed: int,
        rule=None) -> list[tuple[int, ...]]:
    """First n_tokens committed by speculative sampling, for TRIALS copies of PROMPT."""
    gen = torch.Generator().manual_seed(seed)
    ctxs = [list(PROMPT) for _ in range(TRIALS)]
    outs: list[list[int]] = [[] for _ in range(TRIALS)]
    while True:
        active = [i for i in range(TRIALS) if len(outs[i]) < n_tokens]
        if not active:
            return [tuple(o[:n_tokens]) for o in outs]
        trees = make_trees(kind, [ctxs[i] for i in active], gen)
        logits = [TARGET.tree_logits(t, ctxs[i]) for i, t in zip(active, trees)]
        if rule is not None:
            results = [rule(t, lg, gen) for t, lg in zip(trees, logits)]
        elif kind == "beam":  # exercise the batched entry point too
            n = len(trees)
            results = verify_batch(trees, torch.cat(logits), [temperature] * n, [top_p] * n, gen)
        else:
            results = [verify(t, lg, temperature, top_p, gen) for t, lg in zip(trees, logits)]
        for i, res in zip(active, results):
            ctxs[i] += res.tokens
            outs[i] += res.tokens


def chi_square_p(samples: list[tuple[int, ...]], expected: dict[tuple[int, ...], float]) -> float:
    """p-value of the observed counts against `expected` probabilities; cells with expected
    count < 5 are pooled; a sample in a zero-probability cell fails outright."""
    counts: dict[tuple[int, ...], int] = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    for s in counts:
        assert expected.get(s, 0.0) > 0, f"sampled {s}, which has target probability 0"
    n = len(samples)
    obs, exp, pool_o, pool_e = [], [], 0, 0.0
    for cell, p in expected.items():
        if p * n < 5:
            pool_o += counts.get(cell, 0)
            pool_e += p * n
        else:
            obs.append(counts.get(cell, 0))
            exp.append(p * n)
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    scale = n / sum(exp)  # float rounding of the probabilities
    return float(chisquare(obs, [e * scale for e in exp]).pvalue)


def expected_first(temperature: float, top_p: float) -> dict[tuple[int, ...], float]:
    p = target_probs(PROMPT, temperature, top_p).tolist()
    return {(a,): p[a] for a in range(V) if p[a] > 0}


def expected_two(temperature: float, top_p: float) -> dict[tuple[int, ...], float]:
    p1 = target_probs(PROMPT, temperature, top_p).tolist()
    out = {}
    for a in range(V):
        if p1[a] == 0:
            continue
        p2 = target_probs(PROMPT + [a], temperature, top_p).tolist()
        out.update({(a, b): p1[a] * p2[b] for b in range(V) if p2[b] > 0})
    return out


CASES = [
    ("beam", 1.0, 1.0),
    ("beam", 0.6, 0.8),
    ("beam_selected", 1.3, 0.9),
    ("chain", 1.0, 1.0),
    ("chain", 0.7, 0.85),
    ("sampled_tree", 1.0, 1.0),
    ("sampled_tree", 1.5, 0.9),
    ("chain_trimmed", 0.8, 0.9),
]


@pytest.mark.parametrize("kind, temperature, top_p", CASES)
def test_first_two_tokens_follow_target(kind, temperature, top_p):
    samples = run(kind, temperature, top_p, n_tokens=2, seed=7)
    assert chi_square_p([s[:1] for s in samples], expected_first(temperature, top_p)) > P_MIN
    assert chi_square_p(samples, expected_two(temperature, top_p)) > P_MIN


def test_drafts_are_accepted_often():
    """Non-vacuous: with sampling, the trees do get accepted tokens (p/q rule and matching)."""
    gen = torch.Generator().manual_seed(3)
    for kind in ("beam", "chain", "sampled_tree"):
        trees = make_trees(kind, [list(PROMPT)] * 300, gen)
        acc = [verify(t, TARGET.tree_logits(t, PROMPT), 1.0, 1.0, gen).accepted for t in trees]
        assert sum(acc) / len(acc) > 0.5, kind


def test_negative_control_lossy_rules_are_detected():
    # p/q acceptance after a trim that looked at the drafted tokens' confidences.
    lossy = run("chain_trimmed_pq_LOSSY", 1.0, 1.0, n_tokens=1, seed=7)
    assert chi_square_p(lossy, expected_first(1.0, 1.0)) < 1e-6

    # Accepting the draft's first token without checking it: first token ~ q, not p.
    def accept_first(tree, logits, gen):
        res = sampling_verify(tree, logits_to_probs(logits), gen)
        res.tokens = [int(tree.tokens[1])]
        return res

    naive = run("chain", 1.0, 1.0, n_tokens=1, seed=7, rule=accept_first)
    assert chi_square_p(naive, expected_first(1.0, 1.0)) < 1e-6


def test_speculative_sampling_needs_sampled_tree():
    tree = build_trees(DRAFT.draft_step([PROMPT]), torch.tensor([PROMPT[-1]]), 2, 2)[0]
    probs = logits_to_probs(TARGET.tree_logits(tree, PROMPT))
    with pytest.raises(ValueError, match="child_dist"):
        speculative_sampling_verify(tree, probs)


def test_top_p_keeps_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert logits_to_probs(logits, 1.0, 0.75).tolist()[0] == pytest.approx([0.625, 0.375, 0, 0])
    assert logits_to_probs(logits, 1.0, 0.85).tolist()[0] == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])
    sharp = logits_to_probs(logits, 0.5, 1.0)[0]
    assert float(sharp[0]) == pytest.approx(0.25 / (0.25 + 0.09 + 0.0225 + 0.0025))


def test_verify_batch_with_per_request_settings():
    """One packed batch mixing greedy, two sampling settings and sampled chains (p/q rule):
    every request gets its own target distribution."""
    settings = [(0.0, 1.0), (0.6, 0.8), (1.3, 1.0)]
    gen = torch.Generator().manual_seed(11)
    per_setting = 1500
    ctxs = [list(PROMPT)] * (len(settings) * per_setting)
    beams = make_trees("beam", ctxs, gen)
    chains = make_trees("chain", ctxs, gen)
    trees = [c if i % 2 else b for i, (b, c) in enumerate(zip(beams, chains))]
    temps = [settings[i % 3][0] for i in range(len(trees))]
    tps = [settings[i % 3][1] for i in range(len(trees))]
    logits = torch.cat([TARGET.tree_logits(t, PROMPT) for t in trees])
    results = verify_batch(trees, logits, temps, tps, gen)
    greedy_first = TARGET.greedy_generate(PROMPT, 1)[0]
    assert all(r.tokens[0] == greedy_first for r in results[0::3])
    for k in (1, 2):
        firsts = [(r.tokens[0],) for r in results[k::3]]
        assert chi_square_p(firsts, expected_first(*settings[k])) > P_MIN
    with pytest.raises(ValueError, match="one entry per tree"):
        verify_batch(trees[:2], logits[:trees[0].num_nodes + trees[1].num_nodes], [1.0], [1.0, 1.0])
