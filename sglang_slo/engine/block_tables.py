"""Per-request KV block tables of the target and draft caches (allocation only, no tensors).

A cache of `num_blocks` blocks of `block_size` slots; slot = block * block_size + offset.
A request owns a list of blocks per cache, grown before a forward writes into them and
shrunk after verification rolls back rejected tree tokens. Growing both caches is atomic:
either every block needed is allocated or nothing changes (the scheduler then preempts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_slo.engine.kv_cache import BlockAllocator, blocks_needed


@dataclass
class BlockPool:
    """One cache's block allocator plus its block size."""

    allocator: BlockAllocator
    block_size: int

    @classmethod
    def create(cls, num_blocks: int, block_size: int) -> "BlockPool":
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        return cls(BlockAllocator(num_blocks), block_size)

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    @property
    def capacity_tokens(self) -> int:
        return self.allocator.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return blocks_needed(num_tokens, self.block_size)

    def alloc(self, n: int) -> list[int]:
        return self.allocator.allocate(n)

    def free(self, blocks: list[int]) -> None:
        self.allocator.free(blocks)


class BlockTables:
    """Block lists of every running request in the target cache and (optionally) the draft cache."""

    def __init__(self, target: BlockPool, draft: BlockPool | None = None, reserve_null_block: bool = False):
        self.target = target
        self.draft = draft
        self.target_blocks: dict[str, list[int]] = {}
        self.draft_blocks: dict[str, list[int]] = {}
        self.num_reserved = 0
        if reserve_null_block:
            # Block 0 is never handed out and stays zero: attention pads key tables with
            # block 0, and masked keys must be finite (NaN * 0 = NaN inside SDPA).
            assert target.alloc(1) == [0] and (draft is None or draft.alloc(1) == [0])
            self.num_reserved = 1

    @property
    def block_size(self) -> int:
        """Tokens per target-cache block."""
        return self.target.block_size

    @property
    def capacity_tokens(self) -> int:
        """Target KV slots requests can use."""
        return (self.target.allocator.num_blocks - self.num_reserved) * self.target.block_size

    @property
    def free_tokens(self) -> int:
        """Free target KV slots (what reports call kv_free_tokens)."""
        return self.target.num_free * self.target.block_size

    def extra_blocks(self, rid: str, target_tokens: int, draft_tokens: int = 0) -> tuple[int, int]:
        """Blocks to allocate so `rid` can hold that many tokens in each cache."""
        t = max(0, self.target.blocks_for(target_tokens) - len(self.target_blocks.get(rid, ())))
        d = 0
        if self.draft is not None:
            d = max(0, self.draft.blocks_for(draft_tokens) - len(self.draft_blocks.get(rid, ())))
        return t, d

    def can_grow(self, rid: str, target_tokens: int, draft_tokens: int = 0) -> bool:
        t, d = self.extra_blocks(rid, target_tokens, draft_tokens)
        return t <= self.target.num_free and (self.draft is None or d <= self.draft.num_free)

    def grow(self, rid: str, target_tokens: int, draft_tokens: int = 0) -> bool:
        """Make room for `target_tokens` / `draft_tokens` tokens; False (nothing changed) if full."""
        if not self.can_grow(rid, target_tokens, draft_tokens):
            return False
        t, d = self.extra_blocks(rid, target_tokens, draft_tokens)
        self.target_blocks.setdefault(rid, []).extend(self.target.alloc(t))
        if self.draft is not None:
            self.draft_blocks.setdefault(rid, []).extend(self.draft.alloc(d))
        return True

    def shrink(self, rid: str, target_tokens: int, draft_tokens: int | None = None) -> None:
        """Free blocks beyond what `target_tokens` (and `draft_tokens`) need."""
        _shrink(self.target, self.target_blocks, rid, target_tokens)
        if self.draft is not None and draft_tokens is not None:
            _shrink(self.draft, self.draft_blocks, rid, draft_tokens)

    def release(self, rid: str) -> None:
        """Free every block of `rid` in both caches (finish, abort, preemption)."""
        self.target.free(self.target_blocks.pop(rid, []))
        if self.draft is not None:
            self.draft.free(self.draft_blocks.pop(rid, []))

    def slots(self, rid: str, positions: list[int] | range, draft: bool = False) -> list[int]:
        """Cache slots of token positions `positions` of `rid`."""
        blocks = (self.draft_blocks if draft else self.target_blocks)[rid]
        bs = (self.draft if draft else self.target).block_size
        return [blocks[p // bs] * bs + p % bs for p in positions]

    def table(self, rid: str, draft: bool = False) -> list[int]:
        return (self.draft_blocks if draft else self.target_blocks).get(rid, [])

    def slot_tensor(self, rid: str, num_tokens: int, draft: bool = False) -> torch.Tensor:
        """Slots of positions 0..num_tokens-1 as a LongTensor [num_tokens]."""
        blocks = torch.tensor(self.table(rid, draft), dtype=torch.long)
        bs = (self.draft if draft else self.target).block_size
        return (blocks[:, None] * bs + torch.arange(bs)).flatten()[:num_tokens]


def _shrink(pool: BlockPool, tables: dict[str, list[int]], rid: str, num_tokens: int) -> None:
    blocks = tables.get(rid)
    if not blocks:
        return
    keep = pool.blocks_for(num_tokens)
    if keep < len(blocks):
        pool.free(blocks[keep:])
        del blocks[keep:]
