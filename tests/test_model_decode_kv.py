"""The dense decode copy (`decode_kv.py`): attention over it equals the paged-gather path step
after step while sequences join, leave, reorder and grow unevenly; stale buffer contents
(NaN included) never leak into a step; engines using it decode exactly."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protos import messages as protos
from sglang_slo.engine.attention import decode_batch, decode_step_batch, paged_attention, position_slots
from sglang_slo.engine.decode_kv import DecodeKV
from sglang_slo.engine.kv_cache import KVCache, blocks_needed
from sglang_slo.engine.request import SamplingParams
from sglang_slo.engine.runner import _finite_and_argmax, dense_key
from test_engine_factories import dense_greedy, drive, make_engine, random_prompts, tiny_pair

HEADS, KV_HEADS, D = 4, 2, 8


def _poison_stale(dkv: DecodeKV) -> None:
    """NaN wherever the held copy vouches for nothing: columns >= its width (finite columns
    of held rows, >= their longest key) in every row, and every column of rows past the held
    ones (leavers' old rows, spare rows)."""
    if dkv.k is not None:
        w, b = dkv.width, len(dkv.rids)
        assert w >= max(dkv.lens, default=0)
        for buf in (dkv.k, dkv.v):
            buf[:, :, :, w:] = float("nan")
            buf[:, b:] = float("nan")


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), block_size=st.sampled_from([1, 4, 16]))
def test_decode_kv_matches_gather_over_steps(seed, block_size):
    """Sequences join, leave, reorder, skip positions (tokens committed by other forwards,
    e.g. accepted drafts) and grow unevenly: attention over the copy equals the gather path,
    and each step copies from the paged cache exactly the positions the copy lacked."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    n_seq, steps, max_ctx = 7, 30, 60
    per = blocks_needed(max_ctx + 5 * steps + 1, block_size)
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
    prev: dict[str, int] = {}  # keys held after the last step, per sequence
    for _ in range(steps):
        r = rng.random()
        if r < 0.15 and len(batch_rids) > 1:  # one leaves
            batch_rids.remove(rng.choice(batch_rids))
        elif r < 0.3 and len(batch_rids) < n_seq:  # one joins
            batch_rids.append(rng.choice([s for s in tables if s not in batch_rids]))
        elif r < 0.4:
            rng.shuffle(batch_rids)
        for s in batch_rids:
            if rng.random() < 0.2:
                ctx[s] += rng.randint(1, 4)  # committed elsewhere (a verify, a prefill chunk)
        order = dkv.order_of(tuple(batch_rids)) if rng.random() < 0.7 else None
        run = [batch_rids[i] for i in order] if order is not None else list(batch_rids)
        assert sorted(run) == sorted(batch_rids)
        lens = [ctx[s] for s in run]
        b = len(run)
        q = torch.randn(b, HEADS, D, generator=gen)
        k = torch.randn(2, b, KV_HEADS, D, generator=gen)
        v = torch.randn(2, b, KV_HEADS, D, generator=gen)
        _poison_stale(dkv)
        copied0 = dkv.tokens_copied
        got = decode_batch([tables[s] for s in run], lens, block_size, dkv, tuple(run))
        assert got.dense is not None
        assert dkv.tokens_copied - copied0 == sum(ctx[s] - prev.get(s, 0) for s in run)
        ref = decode_step_batch(position_slots([tables[s] for s in run], max(lens) + 1, block_size), lens)
        assert torch.equal(got.slot_mapping, ref.slot_mapping) and torch.equal(got.positions, ref.positions)
        for layer in range(2):
            a = paged_attention(q, k[layer], v[layer], got, kv, layer, D ** -0.5)
            e = paged_attention(q, k[layer], v[layer], ref, ref_kv, layer, D ** -0.5)
            assert torch.isfinite(a).all()
            assert torch.allclose(a, e, atol=1e-5)
        assert torch.equal(kv.k, ref_kv.k) and torch.equal(kv.v, ref_kv.v)  # paged writes too
        for s in run:
            ctx[s] += 1
        prev = {s: ctx[s] for s in run}


def test_order_of_keeps_rows_and_fills_leavers_rows():
    kv = KVCache(1, 64, 4, KV_HEADS, D)
    dkv = DecodeKV(kv)
    tables = {s: [1 + 4 * i + j for j in range(4)] for i, s in enumerate("abcdefg")}
    ctx = dict.fromkeys(tables, 5)

    def run(rids):
        order = dkv.order_of(rids)
        rows = [rids[i] for i in order] if order is not None else list(rids)
        decode_batch([tables[s] for s in rows], [ctx[s] for s in rows], 4, dkv, tuple(rows))
        for s in rows:
            ctx[s] += 1
        return rows

    assert run(("a", "b", "c", "d")) == ["a", "b", "c", "d"]
    assert run(("d", "c", "b", "a")) == ["a", "b", "c", "d"]        # same set: held order
    assert run(("e", "a", "c", "d")) == ["a", "e", "c", "d"]        # e takes b's row
    assert run(("a", "d", "f", "g", "c", "e")) == ["a", "e", "c", "d", "f", "g"]  # appended
    assert run(("g", "a")) == ["a", "g"]                            # last row moves down
    assert dkv.rows_filled == 4 + 1 + 2 and dkv.tokens_copied == 5 * 7  # no row copied twice


def test_decode_kv_catches_up_only_positions_committed_elsewhere():
    kv = KVCache(1, 9, 4, KV_HEADS, D)
    kv.k.normal_()
    kv.v.normal_()
    dkv, tables = DecodeKV(kv), [[1, 2, 3, 4], [5, 6, 7, 8]]
    copied = []
    for lens in ([5, 3], [6, 4], [7, 5], [11, 6], [12, 7]):  # the first row skipped 3 (a verify)
        decode_batch(tables, lens, 4, dkv, ("a", "b"))
        copied.append(dkv.tokens_copied)
    assert copied == [8, 8, 8, 11, 11] and dkv.rows_filled == 2
    decode_batch(tables, [12, 8], 4, dkv, ("a", "b"))  # shorter than held: not the same keys
    assert dkv.rows_filled == 3 and dkv.tokens_copied == 11 + 12


def test_rows_outgrowing_the_buffers_after_a_long_sequence_left():
    """A long sequence leaves, then more short ones join than the buffers have rows: they are
    reallocated (held rows carried over) and attention still equals the gather path."""
    bs, per = 4, 64
    kv = KVCache(1, 1 + 12 * per, bs, KV_HEADS, D, dtype=torch.float32)
    kv.k.normal_()
    kv.v.normal_()
    tables = {f"s{i}": list(range(1 + i * per, 1 + (i + 1) * per)) for i in range(12)}
    dkv = DecodeKV(kv)
    ctx = {s: 5 + i for i, s in enumerate(tables)}
    ctx["s0"] = 200
    for rids in (("s0", "s1"), ("s1",), tuple(tables)[1:]):
        lens = [ctx[s] for s in rids]
        got = decode_batch([tables[s] for s in rids], lens, bs, dkv, rids)
        ref = decode_step_batch(position_slots([tables[s] for s in rids], max(lens) + 1, bs), lens)
        q, k, v = torch.randn(len(rids), HEADS, D), torch.randn(len(rids), KV_HEADS, D), torch.randn(len(rids), KV_HEADS, D)
        ref_kv = KVCache(1, 1 + 12 * per, bs, KV_HEADS, D, dtype=torch.float32)
        ref_kv.k.copy_(kv.k)
        ref_kv.v.copy_(kv.v)
        a = paged_attention(q, k, v, got, kv, 0, D ** -0.5)
        assert torch.allclose(a, paged_attention(q, k, v, ref, ref_kv, 0, D ** -0.5), atol=1e-5)
        for s in rids:
            ctx[s] += 1
    assert dkv.k.shape[1] >= 11 and dkv.rows_filled == 2 + 10


def test_admitted_rows_need_no_copy_at_their_first_decode():
    kv = KVCache(1, 17, 4, KV_HEADS, D, dtype=torch.float32)
    kv.k.normal_()
    kv.v.normal_()
    dkv, tables = DecodeKV(kv), {"a": [1, 2, 3, 4], "b": [5, 6, 7, 8], "c": [9, 10, 11, 12]}
    first = decode_batch([tables["a"]], [6], 4, dkv, ("a",))
    paged_attention(torch.randn(1, HEADS, D), torch.randn(1, KV_HEADS, D), torch.randn(1, KV_HEADS, D),
                    first, kv, 0, D ** -0.5)  # writes a's position 6 (paged and dense)
    got = dkv.admit(("b", "a", "c"), [9, 7, 3],
                    lambda n: position_slots([tables[s] for s in "bac"], n, 4))
    assert got == 2 and dkv.rids == ("a", "b", "c") and dkv.tokens_copied == 6 + 9 + 3
    lens = [7, 9, 3]
    batch = decode_batch([tables[s] for s in "abc"], lens, 4, dkv, ("a", "b", "c"))
    assert dkv.tokens_copied == 6 + 9 + 3  # nothing more
    ref = decode_step_batch(position_slots([tables[s] for s in "abc"], 10, 4), lens)
    ref_kv = KVCache(1, 17, 4, KV_HEADS, D, dtype=torch.float32)
    ref_kv.k.copy_(kv.k)
    ref_kv.v.copy_(kv.v)
    q, k, v = torch.randn(3, HEADS, D), torch.randn(3, KV_HEADS, D), torch.randn(3, KV_HEADS, D)
    a = paged_attention(q, k, v, batch, kv, 0, D ** -0.5)
    assert torch.allclose(a, paged_attention(q, k, v, ref, ref_kv, 0, D ** -0.5), atol=1e-5)
    # b finished: a newcomer takes its row, the others keep theirs.
    assert dkv.admit(("d",), [2], lambda n: position_slots([[13, 14]], n, 4), alive={"a", "c"}) == 1
    assert dkv.rids == ("a", "d", "c") and dkv.lens == [8, 2, 4] and dkv.rows_filled == 1 + 2 + 1


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
    dkv, copying_steps = eng.runner.decode_kv, []
    step = dkv.step

    def counting(*a, **k):  # decode steps that filled whole rows from the paged cache
        before = dkv.rows_filled
        got = step(*a, **k)
        copying_steps.append(dkv.rows_filled > before)
        return got

    dkv.step = counting
    out = drive(eng, prompts, lambda i: SamplingParams(max_new_tokens=new[i], ignore_eos=True),
                arrive_at=lambda i: 4 * i)
    for i in range(16):
        assert out[f"r{i}"] == dense_greedy(target, prompts[i], new[i])
    # Once plain decode runs, requests get their rows when their prefill completes: only
    # the very first decode step filled rows (later ones copy at most the token each running
    # request decoded in a forward shared with a prefill chunk).
    assert len(copying_steps) > 50 and sum(copying_steps) == 1 and copying_steps[0]
    assert eng.runner.decode_kv.rows_filled == 16  # each request's row filled once


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
    assert eng.runner.decode_kv.rows_filled == 6


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


def test_copy_survives_verify_and_prefill_steps_and_stays_exact():
    """Steps alternate at random between plain decode (all depth 0), verify trees and prefill
    chunks, with staggered arrivals and a KV pool small enough to preempt: greedy outputs equal
    the non-speculative engine's, and a plain step after other forwards copies only the tokens
    committed meanwhile (rows are filled once per request lifetime, not after every verify)."""
    target, draft = tiny_pair(seed=5)
    prompts = random_prompts(14, seed=9)
    params = lambda i: SamplingParams(max_new_tokens=18, ignore_eos=True)  # noqa: E731
    arrive = lambda i: 3 * (i % 5)  # noqa: E731
    ref = drive(make_engine(target), prompts, params, arrive_at=arrive)
    rng = random.Random(1)
    eng = make_engine(target, draft)
    plain_steps = [0]

    def plan_for(engine, step):
        live = list(engine.requests.values())
        decoding = [r for r in live if r.output_ids and not r.is_prefilling]
        # Now and then the plan preempts a decoding request (recomputed later).
        out = ([protos.AdmissionDecision(rng.choice(decoding).rid, protos.Decision.PREEMPT)]
               if decoding and rng.random() < 0.08 else [])
        depth = 0 if rng.random() < 0.5 else rng.randint(1, 4)
        width = rng.randint(1, 2)
        plain_steps[0] += depth == 0
        return protos.Plan(step=step, valid_until_s=float("inf"), token_budget=rng.choice([8, 64]),
                           prefill=[protos.PrefillChunk(r.rid, rng.choice([4, 16])) for r in live
                                    if r.is_prefilling or not r.output_ids],
                           decode=[protos.DecodeEntry(r.rid, min_tokens=1.0, tree_cap=1 + depth * width,
                                                      depth=depth, width=width) for r in live],
                           decisions=out)

    def held_rows_equal_the_paged_cache(engine, _):
        dkv, kv = engine.runner.decode_kv, engine.kv
        key_of = {dense_key(r): r for r in engine.requests.values()}
        for j, (key, n) in enumerate(zip(dkv.rids, dkv.lens)):
            r = key_of.get(key)
            if r is None or r.num_computed < n:
                continue  # finished or preempted: its row is never used again
            slots = torch.tensor(engine.tables.slots(r.rid, range(n)))
            for layer in range(kv.num_layers):
                k, v = kv.layer_slots(layer)
                assert torch.equal(dkv.k[layer, j, :, :n], k[slots].transpose(0, 1))
                assert torch.equal(dkv.v[layer, j, :, :n], v[slots].transpose(0, 1))
            checked[0] += 1

    checked = [0]
    out = drive(eng, prompts, params, arrive_at=arrive, plan_for=plan_for, on_step=held_rows_equal_the_paged_cache)
    assert out == ref and checked[0] > 50
    eng.check_kv()
    dkv = eng.runner.decode_kv
    assert eng.scheduler.num_preemptions > 0 and plain_steps[0] > 20
    # Filled once per lifetime (a preemption starts another); before, every plain step after
    # a verify or prefill forward refilled every row.
    assert 0 < dkv.rows_filled <= len(prompts) + eng.scheduler.num_preemptions


def test_dense_key_is_one_kv_lifetime():
    from sglang_slo.engine.request import Request
    a = Request("r", [1, 2, 3], SamplingParams(max_new_tokens=4), protos.Slo(1.0, 1.0), 0.0)
    key = dense_key(a)
    assert dense_key(a) == key
    a.num_preemptions += 1  # recomputed after a preemption: other keys
    assert dense_key(a) != key
    b = Request("r", [1, 2, 3], SamplingParams(max_new_tokens=4), protos.Slo(1.0, 1.0), 0.0)  # the id again, another request
    assert dense_key(b) not in (key, dense_key(a))
