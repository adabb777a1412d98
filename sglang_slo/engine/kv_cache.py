"""Paged KV cache: fixed-size blocks, a block allocator, and slot arithmetic.

A *slot* is one token's K/V row: `slot = block_id * block_size + offset`. A sequence owns a
block table (list of block ids); token position `p` of the sequence lives in slot
`block_table[p // block_size] * block_size + p % block_size`.

One `KVCache` per model (one for the target, one for the draft); each has its own
`BlockAllocator`. Typical use by the engine:

    alloc = BlockAllocator(num_blocks)
    kv = KVCache.for_model(cfg, num_blocks, block_size=16, dtype=torch.float32)
    table = alloc.allocate(blocks_needed(prompt_len + 1, kv.block_size))
    slots = slots_for_positions(table, range(ctx, ctx + n), kv.block_size)   # new tokens
    ... model.forward(...) writes K/V into `slots` ...
    kv.move_slots(src_slots, dst_slots)   # after tree verify: compact the accepted path
    alloc.free(table)

Tree verify: the tree's tokens are written to scratch slots (for example the sequence's own
next positions in tree order); after acceptance the accepted path's K/V is copied with
`move_slots` to the sequence's next contiguous positions. Rejected slots need no cleanup:
they are overwritten later or their blocks freed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from sglang_slo.engine.config import ModelConfig


class BlockAllocator:
    """Hands out block ids from a free list, with reference counts (for shared prefixes).

    `allocate(n)` returns `n` distinct blocks with refcount 1; `share(blocks)` adds a
    reference; `free(blocks)` drops one reference and returns blocks that reach 0 to the
    free list. Freeing a block that is not allocated raises `ValueError`.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        # Pop from the end: low ids first, which keeps tests and traces readable.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._refcount: list[int] = [0] * num_blocks

    @property
    def num_free(self) -> int:
        """Blocks available to `allocate`."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks held by at least one owner."""
        return self.num_blocks - len(self._free)

    def can_allocate(self, n: int) -> bool:
        """True if `allocate(n)` would succeed."""
        return 0 <= n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks (refcount 1 each). Raises `MemoryError` if too few are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise MemoryError(f"KV cache out of blocks: need {n}, free {len(self._free)}")
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._refcount[b] = 1
        return blocks

    def share(self, blocks: Iterable[int]) -> None:
        """Add one reference to each (already allocated) block."""
        for b in blocks:
            self._check_held(b)
            self._refcount[b] += 1

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference to each block; blocks reaching zero become free."""
        for b in blocks:
            self._check_held(b)
            self._refcount[b] -= 1
            if self._refcount[b] == 0:
                self._free.append(b)

    def refcount(self, block: int) -> int:
        """Current number of owners of `block`."""
        return self._refcount[block]

    def check_consistent(self, expected_used: int | None = None) -> None:
        """Raise `AssertionError` on a leak or double free (free list vs refcounts).

        `expected_used`: blocks the caller believes are held (for example 0 when every
        request has finished).
        """
        free_set = set(self._free)
        if len(free_set) != len(self._free):
            raise AssertionError("a block is on the free list twice")
        for b, rc in enumerate(self._refcount):
            if (rc == 0) != (b in free_set) or rc < 0:
                raise AssertionError(f"block {b}: refcount {rc}, on free list {b in free_set}")
        if expected_used is not None and self.num_used != expected_used:
            raise AssertionError(f"{self.num_used} blocks in use, expected {expected_used} (leak)")

    def _check_held(self, b: int) -> None:
        if not 0 <= b < self.num_blocks:
            raise ValueError(f"block id {b} out of range [0, {self.num_blocks})")
        if self._refcount[b] <= 0:
            raise ValueError(f"block {b} is not allocated (double free?)")


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


def slots_for_positions(block_table: Sequence[int], positions: Iterable[int],
                        block_size: int) -> list[int]:
    """Slot of each token position of a sequence with this block table."""
    out = []
    for p in positions:
        i = p // block_size
        if i >= len(block_table):
            raise IndexError(f"position {p} beyond the {len(block_table)} blocks of the table")
        out.append(block_table[i] * block_size + p % block_size)
    return out


def slot_tensor(block_table: Sequence[int], num_tokens: int, block_size: int,
                start: int = 0) -> torch.Tensor:
    """Slots of positions [start, start + num_tokens) as an int64 tensor (vectorised)."""
    if blocks_needed(start + num_tokens, block_size) > len(block_table):
        raise IndexError(f"positions up to {start + num_tokens} need more than "
                         f"{len(block_table)} blocks")
    pos = torch.arange(start, start + num_tokens)
    table = torch.as_tensor(block_table, dtype=torch.int64)
    return table[pos // block_size] * block_size + pos % block_size


class KVCache:
    """K and V tensors of one model, `[layers, num_blocks, block_size, kv_heads, head_dim]`."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        if min(num_layers, num_blocks, block_size, num_kv_heads, head_dim) <= 0:
            raise ValueError("KVCache dimensions must be positive")
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim

    @classmethod
    def for_model(cls, cfg: ModelConfig, num_blocks: int, block_size: int = 16,
                  dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> KVCache:
        """A cache shaped for `cfg`."""
        return cls(cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads,
                   cfg.head_dim, dtype, device)

    @property
    def num_slots(self) -> int:
        """Token rows per layer."""
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        """Memory held by K and V, bytes."""
        return 2 * self.k.numel() * self.k.element_size()

    def layer_slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer as flat views `[num_slots, kv_heads, head_dim]`."""
        shape = (self.num_slots, self.num_kv_heads, self.head_dim)
        return self.k[layer].view(shape), self.v[layer].view(shape)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new K/V rows `[n, kv_heads, head_dim]` at `slots [n]` of one layer."""
        k_flat, v_flat = self.layer_slots(layer)
        k_flat.index_copy_(0, slots, k.to(k_flat.dtype))
        v_flat.index_copy_(0, slots, v.to(v_flat.dtype))

    def move_slots(self, src_slots: Sequence[int] | torch.Tensor,
                   dst_slots: Sequence[int] | torch.Tensor) -> None:
        """Copy K/V of every layer from `src_slots` to `dst_slots` (same length).

        Safe when the two overlap (reads happen before writes). Used after tree verify to
        move the accepted path's K/V into the sequence's next contiguous positions.
        """
        src = torch.as_tensor(src_slots, dtype=torch.int64, device=self.k.device)
        dst = torch.as_tensor(dst_slots, dtype=torch.int64, device=self.k.device)
        if src.shape != dst.shape or src.dim() != 1:
            raise ValueError(f"src and dst must be 1-D and equal length, got {tuple(src.shape)} "
                             f"and {tuple(dst.shape)}")
        if src.numel() == 0:
            return
        both = torch.cat([src, dst])
        if int(both.max()) >= self.num_slots or int(both.min()) < 0:
            raise IndexError(f"slot out of range [0, {self.num_slots})")
        shape = (self.num_layers, self.num_slots, self.num_kv_heads, self.head_dim)
        for t in (self.k, self.v):
            flat = t.view(shape)
            flat[:, dst] = flat[:, src]  # advanced indexing gathers a copy first
