"""Greedy chains that stop early on low draft confidence (`Drafter.chain_stop_prob`): the chain
is a prefix of the full-depth one ending at its first low-probability token, speculation stays
lossless, and the draft cache keeps only tokens that were really fed to the draft model."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from protos import messages as protos
from sglang_slo.engine.request import SamplingParams
from test_engine_factories import drive, make_engine, random_prompts, tiny_pair

CHAIN = dict(fallback_depth=5, fallback_width=1, fallback_tree_cap=6, fallback_budget=256)


def test_chain_stops_after_its_first_low_probability_token():
    target, draft = tiny_pair(seed=0, noise=0.3)
    eng = make_engine(target, draft)
    for i, p in enumerate(random_prompts(6, seed=11)):
        eng.add_request(f"c{i}", p, SamplingParams(max_new_tokens=40, ignore_eos=True), protos.Slo(1.0, 1.0))
    while any(not r.output_ids for r in eng.requests.values()):
        eng.step()
    reqs = list(eng.requests.values())
    depths = [6, 5, 6, 3, 6, 1]
    for r in reqs:
        assert eng.tables.grow(r.rid, r.num_tokens + 8, r.num_tokens + 8)
    drafter = eng.runner.drafter
    computed = [r.num_draft_computed for r in reqs]
    full, _, _, _ = drafter._build_chains(reqs, depths)
    probs = [math.exp(x) for t in full for x in t.draft_logprob[1:].tolist()]
    stop = sorted(probs)[len(probs) // 2]  # median: some chains stop early, some do not
    for r, c in zip(reqs, computed):
        r.num_draft_computed = c
    early, steps, _, _ = drafter._build_chains(reqs, depths, stop)
    stopped = 0
    for a, b, d in zip(early, full, depths):
        n = a.num_nodes - 1
        assert 1 <= n <= d
        assert a.tokens.tolist() == b.tokens[: n + 1].tolist()
        assert torch.allclose(a.draft_logprob, b.draft_logprob[: n + 1], atol=1e-9)
        p = a.draft_logprob[1:].exp().tolist()
        assert all(x >= stop for x in p[:-1])
        assert p[-1] < stop or n == d
        stopped += n < d
    assert stopped > 0
    assert steps == max(t.num_nodes - 1 for t in early)


def test_early_stopping_chains_are_lossless_and_keep_the_draft_cache_exact():
    target, draft = tiny_pair(seed=0)
    prompts = random_prompts(12, seed=5)
    params = lambda i: SamplingParams(max_new_tokens=24, ignore_eos=True)  # noqa: E731
    ref = drive(make_engine(target), prompts, params)
    eng = make_engine(target, draft, **CHAIN)
    eng.runner.drafter.chain_stop_prob = 0.9  # stop often, often right after an accepted token
    kv, tables = eng.runner.drafter.kv, eng.tables
    layer = draft.model.layers[0]
    checked = {"positions": 0, "early": 0}

    def check_draft_cache(engine, out):
        """Layer-0 keys depend only on (token, position): every position the draft cache
        claims to hold must carry the key of the committed token there."""
        checked["early"] += sum(1 for p in out.report.progress if p.verified and p.depth < CHAIN["fallback_depth"])
        for r in engine.requests.values():
            n = r.num_draft_computed
            if n == 0:
                continue
            ids, pos = torch.tensor(r.all_ids[:n]), torch.arange(n)
            with torch.inference_mode():
                h = F.embedding(ids, draft.model.embed_tokens.weight)
                _, k, _ = layer.self_attn._qkv(layer.input_layernorm.forward(h),
                                               draft.model.rotary_emb.tables(pos, h.dtype))
            cached = kv.layer_slots(0)[0][torch.tensor(tables.slots(r.rid, range(n), draft=True))]
            assert torch.allclose(cached, k.to(cached.dtype), atol=1e-6), r.rid
            checked["positions"] += n

    out = drive(eng, prompts, params, arrive_at=lambda i: i % 4, on_step=check_draft_cache)
    assert out == ref
    assert checked["positions"] > 0 and checked["early"] > 0
