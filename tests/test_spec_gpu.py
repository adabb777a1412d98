"""The speculation kernels on CUDA give the same trees, masks and greedy output as on CPU,
and sampling stays lossless with a CUDA generator. Skipped without CUDA."""

from __future__ import annotations

import random

import pytest
import torch

from sglang_slo.spec.select import select_trees
from sglang_slo.spec.table_lm import TableLM
from sglang_slo.spec.tree import ancestor_mask, build_trees, sample_trees, tree_positions
from sglang_slo.spec.verify import verify_batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

V = 32


def pair(device: str) -> tuple[TableLM, TableLM]:
    target = TableLM.random(V, seed=3, device=device)
    return target, target.perturbed(noise=1.0, seed=4)


def test_trees_and_masks_match_cpu():
    rng = random.Random(0)
    prompts = [[rng.randrange(V) for _ in range(3)] for _ in range(16)]
    depths = [rng.randint(0, 6) for _ in prompts]
    widths = [rng.randint(1, 4) for _ in prompts]
    out = {}
    for dev in ("cpu", "cuda"):
        _, draft = pair(dev)
        roots = torch.tensor([p[-1] for p in prompts], device=dev)
        out[dev] = build_trees(draft.draft_step(prompts), roots, depths, widths)
    for a, b in zip(out["cpu"], out["cuda"]):
        assert b.tokens.is_cuda and ancestor_mask(b).is_cuda
        assert a.tokens.tolist() == b.tokens.cpu().tolist()
        assert a.parents.tolist() == b.parents.cpu().tolist()
        assert torch.allclose(a.path_logprob, b.path_logprob.cpu(), atol=1e-4)
        assert torch.equal(ancestor_mask(a), ancestor_mask(b).cpu())
        assert tree_positions(b, 9).cpu().tolist() == tree_positions(a, 9).tolist()


def test_speculative_greedy_equals_greedy_on_cuda():
    target, draft = pair("cuda")
    rng = random.Random(1)
    prompts = [[rng.randrange(V) for _ in range(4)] for _ in range(16)]
    seqs = [list(p) for p in prompts]
    n_tokens = 20
    while any(len(s) - len(p) < n_tokens for s, p in zip(seqs, prompts)):
        roots = torch.tensor([s[-1] for s in seqs], device="cuda")
        trees = build_trees(draft.draft_step(seqs), roots, depth=5, width=2)
        sel = select_trees([t.candidates(2.0, 8) for t in trees], budget=5 * len(trees))
        subs = [t.subtree(n) for t, n in zip(trees, sel.nodes)]
        logits = torch.cat([target.tree_logits(t, s) for t, s in zip(subs, seqs)])
        for s, res in zip(seqs, verify_batch(subs, logits, [0.0] * len(subs), [1.0] * len(subs))):
            s += res.tokens
    cpu_target, _ = pair("cpu")
    for s, p in zip(seqs, prompts):
        assert s[len(p):len(p) + n_tokens] == cpu_target.greedy_generate(p, n_tokens)


def test_sampled_chains_first_token_on_cuda():
    from scipy.stats import chisquare

    target, draft = pair("cuda")
    prompt = [1, 2]
    n = 4000
    gen = torch.Generator(device="cuda").manual_seed(0)
    chains = sample_trees(draft.draft_step([prompt] * n), torch.tensor([2] * n, device="cuda"),
                          [1, 1, 1], generator=gen)
    logits = torch.cat([target.tree_logits(t, prompt) for t in chains])
    res = verify_batch(chains, logits, [1.0] * n, [1.0] * n, gen)
    p = torch.softmax(target.table[1, 2].float(), -1).cpu().tolist()
    counts = [0] * V
    for r in res:
        counts[r.tokens[0]] += 1
    keep = [i for i in range(V) if p[i] * n >= 5]
    obs = [counts[i] for i in keep] + [n - sum(counts[i] for i in keep)]
    exp = [p[i] * n for i in keep] + [n - sum(p[i] * n for i in keep)]
    assert chisquare(obs, exp).pvalue > 1e-3
