"""The dense decode copy (`decode_kv.py`): attention over it equals the paged-gather path step
after step while sequences join, leave, reorder and grow unevenly; stale buffer contents
(NaN included) never leak into a step; engines using it decode exactly."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_slo.engine.attention import decode_batch, decode_step_batch, paged_attention, position_slots
from sglang_slo.engine.decode_kv import DecodeKV
from sglang_slo.engine.kv_cache import KVCache, blocks_needed
from sglang_slo.engine.request import SamplingParams
from sglang_slo.engine.runner import _finite_and_argmax
from test_engine_factories import dense_greedy, drive, make_engine, random_prompts, tiny_pair

HEADS, KV_HEADS, D = 4, 2, 8


def _poison_stale(dkv: DecodeKV) -> None:
    """NaN in every buffer position the held copy does not vouch for (>= its longest row)."""
    if dkv.k is not None and dkv.lens:
        dkv.k[:, :, :, max(dkv.lens):] = float("nan")
        dkv.v[:, :, :, max(dkv.lens):] = float("nan")


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10**6), block_size=st.sampled_from([1, 4, 16]))
def test_decode_kv_matches_gather_over_steps(seed, block_size):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    n_seq, steps, max_ctx = 7, 30, 60
    per = blocks_needed(max_ctx + steps + 1, block_size)
    ids = list(range(1, n_seq * per + 1))  # block 0: the null block
    rng.shuffle(ids)
    tables = {f"s{i}": ids[i * per:(i + 1) * per] for i in range(n_seq)}
    ctx = {rid: rng.randrange(1, max_ctx) for rid in tables}
    kv = KVCache(2, n_seq * per + 1, block_size, KV_HEADS, D, dtype=torch.float32)
    kv.k.normal_(generator=gen)
    kv.v.normal_(generator=gen)
    ref_kv = KVCache(2, n_seq * per + 1, block_size, KV_HEADS, D, dtype=torch.float32)
    ref_kv.k.copy_(kv.k)
    ref_kv.v.copy_(kv.v)
    dkv = DecodeKV(kv)
    batch_rids = rng.sample(sorted(tables), 4)
    changes = 1
    for _ in range(steps):
        r = rng.random()
        if r < 0.1 and len(batch_rids) > 1:  # one leaves
            batch_rids.remove(rng.choice(batch_rids))
            changes += 1
        elif r < 0.2 and len(batch_rids) < n_seq:  # one joins
            batch_rids.append(rng.choice([s for s in tables if s not in batch_rids]))
            changes += 1
        elif r < 0.25:
            rng.shuffle(batch_rids)
            changes += 1
        lens = [ctx[s] for s in batch_rids]
        b = len(batch_rids)
        q = torch.randn(b, HEADS, D, generator=gen)
        k = torch.randn(2, b, KV_HEADS, D, generator=gen)
        v = torch.randn(2, b, KV_HEADS, D, generator=gen)
        _poison_stale(dkv)
        got = decode_batch([tables[s] for s in batch_rids], lens, block_size, dkv, tuple(batch_rids))
        assert got.dense is not None
        ref = decode_step_batch(position_slots([tables[s] for s in batch_rids], max(lens) + 1, block_size), lens)
        assert torch.equal(got.slot_mapping, ref.slot_mapping) and torch.equal(got.positions, ref.positions)
        for layer in range(2):
            a = paged_attention(q, k[layer], v[layer], got, kv, layer, D ** -0.5)
            e = paged_attention(q, k[layer], v[layer], ref, ref_kv, layer, D ** -0.5)
            assert torch.isfinite(a).all()
            assert torch.allclose(a, e, atol=1e-5)
        assert torch.equal(kv.k, ref_kv.k) and torch.equal(kv.v, ref_kv.v)  # paged writes too
        for s in batch_rids:
            ctx[s] += 1
    # Steady steps extend the copy in place: it is rebuilt only on changes (and to grow).
    assert dkv.rebuilds <= changes + 3


def test_decode_kv_rebuilds_when_a_context_did_not_advance_by_one():
    kv = KVCache(1, 9, 4, KV_HEADS, D)
    kv.k.normal_()
    kv.v.normal_()
    dkv, tables = DecodeKV(kv), [[1, 2, 3, 4], [5, 6, 7, 8]]
    for lens in ([5, 3], [6, 4], [7, 5], [9, 6]):  # the first row skipped a position (e.g. spec)
        decode_batch(tables, lens, 4, dkv, ("a", "b"))
    assert dkv.rebuilds == 2


def test_decode_kv_too_big_falls_back_to_gathering():
    kv = KVCache(1, 9, 4, KV_HEADS, D)
    batch = decode_batch([[1, 2], [3, 4]], [5, 3], 4, DecodeKV(kv, max_bytes=1024), ("a", "b"))
    assert batch.dense is None and len(batch.groups) == 1


def test_finite_and_argmax():
    big = torch.full((4,), 3e38)  # finite entries whose sum overflows
    logits = torch.stack([torch.tensor([1.0, 5.0, 5.0, 2.0]), torch.tensor([0.0, float("nan"), 1.0, 9.0]),
                          torch.tensor([0.0, float("-inf"), 1.0, 9.0]), big])
    finite, arg = _finite_and_argmax(logits)
    assert finite == [True, False, False, True]
    assert arg[0] == 1 and arg[2] == 3 and arg[3] == 0  # first maximum, like argmax
    x = torch.randint(0, 4, (64, 300)).float()  # many ties
    assert _finite_and_argmax(x)[1] == x.argmax(-1).tolist()


@pytest.fixture(scope="module")
def target():
    return tiny_pair(seed=3)[0]


def test_engine_decodes_exactly_with_staggered_arrivals(target):
    """Requests join and leave a target-only engine: every output equals a dense recompute
    and steady decode steps reuse the copy (far fewer rebuilds than decode steps)."""
    prompts = random_prompts(16, seed=4)
    eng = make_engine(target)
    new = [6 + 3 * (i % 5) for i in range(16)]
    out = drive(eng, prompts, lambda i: SamplingParams(max_new_tokens=new[i], ignore_eos=True),
                arrive_at=lambda i: 4 * i)
    for i in range(16):
        assert out[f"r{i}"] == dense_greedy(target, prompts[i], new[i])
    assert 0 < eng.runner.decode_kv.rebuilds < eng.step_index / 2


def test_engine_runs_a_reordered_batch_in_the_held_order(target):
    """A batch of the same requests in another order (plans and deadlines reorder decodes)
    runs over the held copy in its row order; outputs stay exact."""
    prompts = random_prompts(6, seed=6)
    eng = make_engine(target)
    schedule = eng.scheduler.schedule

    def flipping(plan, now):
        batch = schedule(plan, now)
        if eng.step_index % 2:  # rotate (not an involution: catches a wrong inverse)
            batch.decodes = batch.decodes[1:] + batch.decodes[:1]
        return batch

    eng.scheduler.schedule = flipping
    out = drive(eng, prompts, lambda i: SamplingParams(max_new_tokens=20, ignore_eos=True))
    for i in range(6):
        assert out[f"r{i}"] == dense_greedy(target, prompts[i], 20)
    assert eng.runner.decode_kv.rebuilds <= 3


def test_nan_in_one_decoding_request_spares_the_others(target):
    """A request whose decode hits NaN (poisoned embedding row) errors; the NaN K/V it left in
    the dense copy never reaches the others, which finish exactly as without the poison."""
    prompts = random_prompts(10, seed=8)
    params = lambda i: SamplingParams(max_new_tokens=12, ignore_eos=True)  # noqa: E731
    clean = drive(make_engine(target), prompts, params)
    poison = clean["r0"][4]  # r0 feeds it back at its 5th decode step
    keep = [i for i in range(10) if poison not in prompts[i]]
    sick = type(target)(target.config).double().eval()
    sick.load_state_dict(target.state_dict())
    with torch.no_grad():
        sick.model.embed_tokens.weight[poison] = float("nan")
    eng = make_engine(sick)
    finished = {}
    out = drive(eng, [prompts[i] for i in keep], params,
                on_step=lambda e, o: finished.update({f.rid: f.reason for f in o.finished}))
    errored = 0
    for j, i in enumerate(keep):
        if poison in clean[f"r{i}"]:
            errored += 1
        else:
            assert out[f"r{j}"] == clean[f"r{i}"]
    assert errored >= 1 and len(keep) - errored >= 3
    eng.check_kv()
