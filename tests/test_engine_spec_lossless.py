"""Lossless speculation: greedy speculative output == greedy non-speculative output, token for
token, over many prompts, tree shapes (depth, width, tree cap, budget) and batch mixes where
prefill chunks, plain decodes and verify trees share one forward."""

from __future__ import annotations

import random

import pytest
import torch
from scipy import stats

from protos import messages as protos
from sglang_slo.engine.request import SamplingParams
from test_engine_factories import dense_greedy, drive, make_engine, random_prompts, tiny_pair

N_NEW = 24


@pytest.fixture(scope="module")
def pair():
    return tiny_pair(seed=0)


@pytest.fixture(scope="module")
def reference(pair):
    """Non-speculative greedy outputs of 60 prompts (one engine, all at once)."""
    target, _ = pair
    prompts = random_prompts(60, seed=1)
    eng = make_engine(target)
    out = drive(eng, prompts, lambda i: SamplingParams(max_new_tokens=N_NEW, ignore_eos=True))
    return prompts, out


def test_nonspeculative_engine_matches_dense_reference(pair, reference):
    target, _ = pair
    prompts, out = reference
    for i in range(0, 60, 6):
        assert out[f"r{i}"] == dense_greedy(target, prompts[i], N_NEW)


def _random_planner(seed: int, depth: int, width: int, budget: tuple[int, int]):
    """A plan per step with random per-request trees (chains included) and random budgets."""
    rng = random.Random(seed)

    def plan_for(engine, step):
        live = list(engine.requests.values())
        decode = []
        for r in live:
            d = rng.randint(0, depth)
            w = 1 if rng.random() < 0.3 else rng.randint(1, width)  # chain mode 30% of the time
            decode.append(protos.DecodeEntry(r.rid, min_tokens=1 + 3 * rng.random(),
                                             tree_cap=rng.randint(1, 1 + d * w), depth=d, width=w))
        prefill = [protos.PrefillChunk(r.rid, rng.randint(1, 24)) for r in live if r.is_prefilling or not r.output_ids]
        return protos.Plan(step=step, valid_until_s=float("inf"), token_budget=rng.randint(*budget),
                           prefill=prefill, decode=decode)

    return plan_for


@pytest.mark.parametrize("depth,width,budget,stagger", [
    (1, 1, (8, 64), 0),     # single-token chains
    (4, 1, (4, 64), 2),     # chains (SpecServe mode), tight budgets
    (3, 2, (16, 128), 1),
    (6, 3, (8, 256), 3),    # wide deep trees
    (5, 2, (64, 512), 0),
])
def test_greedy_speculative_equals_nonspeculative(pair, reference, depth, width, budget, stagger):
    target, draft = pair
    prompts, ref = reference
    eng = make_engine(target, draft)
    mixed = {"prefill+verify": 0}

    def on_step(engine, out):
        r = out.report
        if r.prefill_tokens and r.verify_tokens > sum(1 for p in r.progress if p.verified == 0 and not p.prefill_tokens):
            mixed["prefill+verify"] += 1

    out = drive(eng, prompts, lambda i: SamplingParams(max_new_tokens=N_NEW, ignore_eos=True),
                arrive_at=lambda i: (i % 10) * stagger, plan_for=_random_planner(depth * 10 + width, depth, width, budget),
                on_step=on_step)
    assert out == ref
    if stagger:
        assert mixed["prefill+verify"] > 0  # prefill chunks and verify trees shared forwards
    eng.check_kv()
    assert eng.tables.target.allocator.num_used == eng.tables.num_reserved


def test_fallback_policy_speculates_losslessly_and_accepts_drafts(pair, reference):
    target, draft = pair
    prompts, ref = reference
    eng = make_engine(target, draft, fallback_depth=4, fallback_width=2, fallback_tree_cap=8, fallback_budget=64)
    accepted = []
    out = drive(eng, prompts, lambda i: SamplingParams(max_new_tokens=N_NEW, ignore_eos=True),
                arrive_at=lambda i: i % 7, on_step=lambda e, o: accepted.extend(p.accepted for p in o.report.progress if p.verified))
    assert out == ref
    assert sum(accepted) / len(accepted) > 0.5  # the noisy draft agrees often: speculation does work


def test_sampling_with_speculation_preserves_the_target_distribution():
    """Joint law of the first two sampled tokens (the second one comes from tree verification)
    matches the target's exact distribution (chi-square), at temperature 0.8 and top_p 0.9."""
    vocab, temp, top_p = 6, 0.8, 0.9
    target, draft = tiny_pair(seed=3, noise=0.3, vocab=vocab, logit_scale=2.0)
    prompt = [1, 2, 3]
    eng = make_engine(target, draft, kv_tokens=1 << 15, fallback_depth=3, fallback_width=2,
                      fallback_tree_cap=7, fallback_budget=4096, max_running=4096)
    n = 1500
    params = lambda i: SamplingParams(max_new_tokens=4, temperature=temp, top_p=top_p, seed=i, ignore_eos=True)  # noqa: E731
    out = drive(eng, [prompt] * n, params)
    counts = torch.zeros(vocab, vocab)
    for toks in out.values():
        counts[toks[0], toks[1]] += 1

    from sglang_slo.spec.verify import logits_to_probs
    with torch.no_grad():
        h = target.forward_dense(torch.tensor([prompt]))
        p1 = logits_to_probs(target.logits(h[0, -1:]), temp, top_p)[0]
        seqs = torch.tensor([prompt + [t] for t in range(vocab)])
        p2 = logits_to_probs(target.logits(target.forward_dense(seqs)[:, -1]), temp, top_p)  # [vocab, vocab]
    expected = (p1[:, None] * p2).flatten() * n
    observed = counts.flatten()
    keep = expected > 5
    assert observed[~keep].sum() <= max(10, 3 * expected[~keep].sum())
    chi2 = stats.chisquare(observed[keep], expected[keep] / expected[keep].sum() * observed[keep].sum())
    assert chi2.pvalue > 1e-3, chi2


def test_chain_fast_path_equals_general_beam_search(pair):
    """Drafter's width-1 fast path (slot table sliced per step) builds the same chains, with
    the same draft log-probs, as the general tree path (`build_trees` over `_tree_step`)."""
    from sglang_slo.spec.tree import build_trees

    target, draft = pair
    eng = make_engine(target, draft)
    prompts = random_prompts(5, seed=7)
    for i, p in enumerate(prompts):
        eng.add_request(f"c{i}", p, SamplingParams(max_new_tokens=50, ignore_eos=True), protos.Slo(1.0, 1.0))
    while any(not r.output_ids for r in eng.requests.values()):
        eng.step()
    reqs = list(eng.requests.values())
    depths = [1, 3, 6, 2, 5]
    for r in reqs:
        assert eng.tables.grow(r.rid, r.num_tokens + 8, r.num_tokens + 8)
    drafter = eng.runner.drafter

    def draft_step(f):
        if f.step == 0:
            return drafter._catch_up([reqs[i] for i in f.request.tolist()])[0]
        return drafter._tree_step(reqs, f)[0]

    # First with a lagging draft cache (catch-up of several tokens), then with only the root
    # missing (the chain path's decode-step catch-up).
    for lag in ("lagging", "root only"):
        for r in reqs:  # re-feeding tokens the draft cache has rewrites the same K/V
            r.num_draft_computed = r.num_tokens - 1 if lag == "root only" else max(0, r.num_tokens - 3)
        computed = [r.num_draft_computed for r in reqs]
        assert (lag == "root only") == all(c == r.num_tokens - 1 for c, r in zip(computed, reqs))
        fast, steps, _, _ = drafter._build_chains(reqs, depths)
        for r, c in zip(reqs, computed):
            r.num_draft_computed = c
        general = build_trees(draft_step, torch.tensor([r.output_ids[-1] for r in reqs]), depths, [1] * 5)
        assert steps == max(depths)
        for a, b, d in zip(fast, general, depths):
            assert a.num_nodes == b.num_nodes == d + 1
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.parents, b.parents)
            assert torch.allclose(a.draft_logprob.double(), b.draft_logprob.double(), atol=1e-6)
            assert a.host().tokens == a.tokens.tolist() and a.host().path_logprob == pytest.approx(
                a.path_logprob.tolist())
