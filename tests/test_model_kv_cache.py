"""Block allocator never leaks or double-frees; slot arithmetic; move_slots copies K/V."""

from __future__ import annotations

import random

import pytest
import torch

from sglang_slo.engine.kv_cache import (BlockAllocator, KVCache, blocks_needed, slot_tensor,
                                        slots_for_positions)


def test_allocator_random_cycles_never_leak():
    rng = random.Random(0)
    alloc = BlockAllocator(64)
    owners: list[list[int]] = []  # each entry holds one reference to its blocks
    for _ in range(5000):
        op = rng.random()
        if op < 0.45:
            n = rng.randrange(0, 10)
            if alloc.can_allocate(n):
                blocks = alloc.allocate(n)
                assert len(set(blocks)) == n
                held = {b for o in owners for b in o}
                assert not held & set(blocks), "handed out a block that is still held"
                owners.append(blocks)
            else:
                with pytest.raises(MemoryError):
                    alloc.allocate(n)
        elif op < 0.55 and owners:  # share a prefix (refcount + 1)
            src = rng.choice(owners)
            prefix = src[:rng.randrange(0, len(src) + 1)]
            alloc.share(prefix)
            owners.append(list(prefix))
        elif owners:
            alloc.free(owners.pop(rng.randrange(len(owners))))
        alloc.check_consistent(expected_used=len({b for o in owners for b in o}))
    for o in owners:
        alloc.free(o)
    alloc.check_consistent(expected_used=0)
    assert alloc.num_free == 64


def test_allocator_rejects_double_free_and_bad_ids():
    alloc = BlockAllocator(4)
    blocks = alloc.allocate(2)
    alloc.free(blocks)
    with pytest.raises(ValueError, match="not allocated"):
        alloc.free(blocks[:1])
    with pytest.raises(ValueError, match="out of range"):
        alloc.free([7])
    with pytest.raises(ValueError):
        alloc.allocate(-1)
    with pytest.raises(ValueError):
        BlockAllocator(0)
    alloc.check_consistent(expected_used=0)
    alloc.allocate(1)
    with pytest.raises(AssertionError, match="leak"):
        alloc.check_consistent(expected_used=0)


def test_slot_helpers_agree():
    table = [7, 2, 9]
    assert blocks_needed(0, 4) == 0 and blocks_needed(9, 4) == 3
    assert slots_for_positions(table, [0, 3, 4, 9], 4) == [28, 31, 8, 37]
    assert slot_tensor(table, 6, 4, start=3).tolist() == slots_for_positions(table, range(3, 9), 4)
    with pytest.raises(IndexError):
        slots_for_positions(table, [12], 4)
    with pytest.raises(IndexError):
        slot_tensor(table, 10, 4, start=3)


def test_move_slots_copies_every_layer_and_handles_overlap():
    kv = KVCache(num_layers=3, num_blocks=4, block_size=2, num_kv_heads=1, head_dim=2)
    kv.k.copy_(torch.arange(kv.k.numel(), dtype=torch.float32).view_as(kv.k))
    kv.v.copy_(-kv.k)
    before = kv.k.clone().view(3, 8, 1, 2)
    kv.move_slots([3, 4, 5], [2, 3, 4])  # overlapping shift left by one
    after = kv.k.view(3, 8, 1, 2)
    assert torch.equal(after[:, 2:5], before[:, 3:6])
    assert torch.equal(after[:, [0, 1, 5, 6, 7]], before[:, [0, 1, 5, 6, 7]])
    assert torch.equal(kv.v, -kv.k)
    with pytest.raises(ValueError):
        kv.move_slots([1, 2], [3])
    with pytest.raises(IndexError):
        kv.move_slots([8], [0])
    assert kv.nbytes == 2 * 3 * 4 * 2 * 1 * 2 * 4
