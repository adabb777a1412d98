"""Paged ragged attention (prefill chunks, decode tokens, verify trees in one batch) equals
attention computed straightforwardly, and tree verify + move_slots keeps the model exact."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_slo.engine.attention import (AttentionBatch, SequenceInput, decode_step_batch, paged_attention,
                                         position_slots)
from sglang_slo.engine.config import ModelConfig
from sglang_slo.engine.kv_cache import KVCache, blocks_needed, slots_for_positions
from sglang_slo.engine.model import LlamaForCausalLM


def random_tree(q: int, rng: random.Random) -> tuple[list[int], torch.Tensor]:
    """Parents (node 0 is the root, parents precede children) and the ancestor-or-self mask."""
    parents = [-1] + [rng.randrange(i) for i in range(1, q)]
    mask = torch.eye(q, dtype=torch.bool)
    for i in range(1, q):
        mask[i] |= mask[parents[i]]
    return parents, mask


def naive_attention(q, keys, vals, allowed, scale):
    """q [n, H, d], keys/vals [k, Hkv, d], allowed [n, k] -> [n, H*d], one head at a time."""
    n, heads, d = q.shape
    group = heads // keys.shape[1]
    out = torch.empty(n, heads, d, dtype=torch.float64)
    for h in range(heads):
        kh, vh = keys[:, h // group].double(), vals[:, h // group].double()
        s = (q[:, h].double() @ kh.T) * scale
        s = s.masked_fill(~allowed, float("-inf"))
        out[:, h] = torch.softmax(s, -1) @ vh
    return out.reshape(n, heads * d)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), num_seqs=st.integers(1, 9), block_size=st.sampled_from([1, 4, 16]))
def test_paged_attention_matches_naive(seed, num_seqs, block_size):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    heads, kv_heads, d = 4, 2, 8
    specs = []
    for _ in range(num_seqs):
        kind = rng.choice(["prefill", "decode", "tree"])
        ctx = rng.randrange(0, 40)
        q = 1 if kind == "decode" else rng.randrange(1, 12)
        specs.append((kind, ctx, q))
    total_blocks = sum(blocks_needed(c + q, block_size) for _, c, q in specs) + 3
    ids = list(range(total_blocks))
    rng.shuffle(ids)  # blocks of a sequence are scattered over the cache
    kv = KVCache(1, total_blocks, block_size, kv_heads, d, dtype=torch.float32)
    kv.k.normal_(generator=gen)
    kv.v.normal_(generator=gen)
    seqs, masks = [], []
    for kind, ctx, q in specs:
        table = [ids.pop() for _ in range(blocks_needed(ctx + q, block_size))]
        tree = random_tree(q, rng)[1] if kind == "tree" else None
        seqs.append(SequenceInput(table, ctx, q, tree_mask=tree))
        masks.append(tree if tree is not None else torch.ones(q, q, dtype=torch.bool).tril())
    batch = AttentionBatch.build(seqs, block_size)
    t = batch.num_tokens
    q_all = torch.randn(t, heads, d, generator=gen)
    k_new, v_new = torch.randn(t, kv_heads, d, generator=gen), torch.randn(t, kv_heads, d, generator=gen)
    out = paged_attention(q_all, k_new, v_new, batch, kv, layer=0, scale=d ** -0.5)
    k_flat, v_flat = kv.layer_slots(0)
    for s, start, mask in zip(seqs, batch.query_starts, masks):
        ctx_slots = slots_for_positions(s.block_table, range(s.context_len), block_size)
        rows = slice(start, start + s.query_len)
        keys = torch.cat([k_flat[ctx_slots], k_new[rows]])
        vals = torch.cat([v_flat[ctx_slots], v_new[rows]])
        allowed = torch.cat([torch.ones(s.query_len, s.context_len, dtype=torch.bool), mask], 1)
        ref = naive_attention(q_all[rows], keys, vals, allowed, d ** -0.5)
        assert torch.allclose(out[rows].double(), ref, atol=1e-5), (s.context_len, s.query_len)


def test_grouping_keeps_decode_apart_from_long_prefill():
    seqs = [SequenceInput(list(range(i * 20, i * 20 + 20)), 100, 1) for i in range(8)]
    seqs.append(SequenceInput(list(range(200, 216)), 0, 250))
    batch = AttentionBatch.build(seqs, 16)
    sizes = sorted(g.q_index.shape[0] for g in batch.groups)
    assert sizes == [1, 8]
    assert not batch.identity_order


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():  # larger weights so that mistakes show
        torch.nn.init.normal_(p, std=0.3)
    return model


def dense_last_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.logits(model.forward_dense(torch.tensor([tokens]))[0, -1:])[0]


def test_mixed_batch_with_tree_matches_dense_forward():
    """Prefill + decode + tree verify in one forward; every row equals a dense recompute."""
    model, bs, rng = tiny_model(), 4, random.Random(3)
    kv = KVCache.for_model(model.config, 64, bs)
    ctx_a = [rng.randrange(97) for _ in range(13)]
    ctx_b = [rng.randrange(97) for _ in range(9)]
    new_c = [rng.randrange(97) for _ in range(7)]
    ta, tb, tc = list(range(0, 8)), list(range(20, 28)), list(range(40, 48))
    # Step 1: prefill the contexts of a and b.
    b1 = AttentionBatch.build([SequenceInput(ta, 0, 13), SequenceInput(tb, 0, 9)], bs)
    model.forward(torch.tensor(ctx_a + ctx_b), b1.positions, b1, kv)
    # Step 2: a verifies a tree, b decodes one token, c prefills a fresh chunk.
    parents, mask = random_tree(6, rng)
    tree_tokens = [rng.randrange(97) for _ in range(6)]
    dec = rng.randrange(97)
    b2 = AttentionBatch.build([SequenceInput(ta, 13, 6, tree_mask=mask),
                               SequenceInput(tb, 9, 1), SequenceInput(tc, 0, 7)], bs)
    depth = mask.sum(-1) - 1
    assert b2.positions[:6].tolist() == (13 + depth).tolist()
    hidden = model.forward(torch.tensor(tree_tokens + [dec] + new_c), b2.positions, b2, kv)
    logits = model.logits(hidden)
    for i in range(6):  # node i sees the context and its root path
        path = [j for j in range(6) if mask[i, j]]
        ref = dense_last_logits(model, ctx_a + [tree_tokens[j] for j in path])
        assert (logits[i] - ref).abs().max() < 1e-4
    assert (logits[6] - dense_last_logits(model, ctx_b + [dec])).abs().max() < 1e-4
    for i in range(7):
        assert (logits[7 + i] - dense_last_logits(model, new_c[:i + 1])).abs().max() < 1e-4
    # Step 3: accept a root-to-leaf path of the tree, compact its K/V, decode after it.
    leaf = max(range(6), key=lambda i: int(depth[i]))
    path = [j for j in range(6) if mask[leaf, j]]
    src = slots_for_positions(ta, [13 + j for j in path], bs)   # tree node j sat at position 13+j
    dst = slots_for_positions(ta, range(13, 13 + len(path)), bs)
    kv.move_slots(src, dst)
    ctx = 13 + len(path)
    nxt = rng.randrange(97)
    b3 = AttentionBatch.build([SequenceInput(ta, ctx, 1)], bs)
    got = model.logits(model.forward(torch.tensor([nxt]), b3.positions, b3, kv))[0]
    ref = dense_last_logits(model, ctx_a + [tree_tokens[j] for j in path] + [nxt])
    assert (got - ref).abs().max() < 1e-4


def test_custom_new_slots_are_used():
    """K/V written to explicit scratch slots are read back from there."""
    model, bs = tiny_model(1), 4
    kv = KVCache.for_model(model.config, 16, bs)
    toks = [5, 6, 7, 8, 9]
    b1 = AttentionBatch.build([SequenceInput([0, 1], 0, 5)], bs)
    model.forward(torch.tensor(toks), b1.positions, b1, kv)
    scratch = slots_for_positions([10, 11], range(2), bs)
    b2 = AttentionBatch.build([SequenceInput([0, 1], 5, 2, new_slots=scratch)], bs)
    got = model.logits(model.forward(torch.tensor([1, 2]), b2.positions, b2, kv))
    assert torch.equal(b2.slot_mapping, torch.tensor(scratch))
    assert (got[1] - dense_last_logits(model, toks + [1, 2])).abs().max() < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_matches_cpu():
    model, bs = tiny_model(4), 4
    cuda = tiny_model(4).cuda()
    _, mask = random_tree(5, random.Random(0))
    outs = []
    for m, dev in ((model, "cpu"), (cuda, "cuda")):
        kv = KVCache.for_model(m.config, 16, bs, device=dev)
        b = AttentionBatch.build([SequenceInput([0, 1, 2], 0, 9), SequenceInput([3, 4], 0, 1),
                                  SequenceInput([5, 6], 0, 5, tree_mask=mask)], bs, device=dev)
        ids = torch.arange(15, device=dev) % 97
        outs.append(m.logits(m.forward(ids, b.positions, b, kv)).cpu())
    assert (outs[0] - outs[1]).abs().max() < 1e-3


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), num_seqs=st.integers(1, 6), block_size=st.sampled_from([1, 4, 16]))
def test_decode_step_batch_equals_build(seed, num_seqs, block_size):
    """The draft chains' tensor-only decode metadata gives the same attention output, K/V
    writes and positions as `AttentionBatch.build` for the same decode tokens."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    heads, kv_heads, d = 4, 2, 8
    ctxs = [rng.randrange(0, 40) for _ in range(num_seqs)]
    per = [blocks_needed(c + 1, block_size) + rng.randrange(2) for c in ctxs]
    ids = list(range(1, sum(per) + 1))  # block 0 = null block (pads short tables)
    rng.shuffle(ids)
    tables, o = [], 0
    for n in per:
        tables.append(ids[o:o + n])
        o += n
    outs = []
    for build in ("build", "decode_step"):
        kv = KVCache(1, sum(per) + 1, block_size, kv_heads, d, dtype=torch.float32)
        kv.k.normal_(generator=torch.Generator().manual_seed(seed))
        kv.v.normal_(generator=torch.Generator().manual_seed(seed + 1))
        if build == "build":
            batch = AttentionBatch.build([SequenceInput(t, c, 1) for t, c in zip(tables, ctxs)], block_size)
        else:
            slots = position_slots(tables, max(ctxs) + 1 + rng.randrange(3), block_size)
            batch = decode_step_batch(slots, ctxs)
        q = torch.randn(num_seqs, heads, d, generator=gen)
        k = torch.randn(num_seqs, kv_heads, d, generator=gen)
        v = torch.randn(num_seqs, kv_heads, d, generator=gen)
        gen = torch.Generator().manual_seed(seed)  # same q/k/v for both
        outs.append((paged_attention(q, k, v, batch, kv, 0, d ** -0.5), batch.positions, batch.slot_mapping, kv.k.clone()))
    (a, pa, sa, ka), (b, pb, sb, kb) = outs
    assert torch.equal(pa, pb) and torch.equal(sa, sb) and torch.equal(ka, kb)
    assert torch.allclose(a, b, atol=1e-6)
