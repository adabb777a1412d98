"""KV cache accounting of the simulated engine: fixed-size blocks, per-owner counts.

Owners are request ids. A finished agent-loop call can *park* its blocks under its session
key (a prefix cache entry); the session's next call *claims* them on arrival. Parked entries
are evicted least-recently-parked first whenever an allocation would otherwise fail.
Invariant: free + held + parked == total blocks (checked by `check()`).
"""

from __future__ import annotations

from collections import OrderedDict


class KvBlocks:
    def __init__(self, capacity_tokens: int, block_tokens: int):
        if capacity_tokens < block_tokens or block_tokens < 1:
            raise ValueError(f"bad KV geometry: {capacity_tokens} tokens in blocks of {block_tokens}")
        self.block_tokens = block_tokens
        self.total_blocks = capacity_tokens // block_tokens
        self.free_blocks = self.total_blocks
        self.held: dict[str, int] = {}  # owner -> blocks
        self.parked: OrderedDict[str, tuple[int, int]] = OrderedDict()  # key -> (blocks, tokens)
        self.peak_used_blocks = 0
        self.evictions = 0

    def blocks_for(self, tokens: int) -> int:
        return -(-max(0, tokens) // self.block_tokens)

    @property
    def free_tokens(self) -> int:
        """Tokens allocatable now (parked prefixes count as free: they are evictable)."""
        return (self.free_blocks + sum(b for b, _ in self.parked.values())) * self.block_tokens

    def can_grow(self, owner: str, tokens: int) -> bool:
        """Whether `grow(owner, tokens)` would succeed (evicting parked prefixes if needed)."""
        need = self.blocks_for(tokens) - self.held.get(owner, 0)
        return need <= self.free_blocks + sum(b for b, _ in self.parked.values())

    def grow(self, owner: str, tokens: int) -> bool:
        """Make `owner` hold enough blocks for `tokens` tokens; False (nothing changed) if impossible."""
        need = self.blocks_for(tokens) - self.held.get(owner, 0)
        if need <= 0:
            return True
        while need > self.free_blocks and self.parked:
            blocks, _ = self.parked.popitem(last=False)[1]
            self.free_blocks += blocks
            self.evictions += 1
        if need > self.free_blocks:
            return False
        self.free_blocks -= need
        self.held[owner] = self.held.get(owner, 0) + need
        self.peak_used_blocks = max(self.peak_used_blocks, self.total_blocks - self.free_blocks)
        return True

    def shrink(self, owner: str, tokens: int) -> None:
        """Keep only the blocks `tokens` tokens need (rejected draft slots are returned)."""
        have = self.held.get(owner, 0)
        keep = min(have, self.blocks_for(tokens))
        self.free_blocks += have - keep
        if owner in self.held:
            self.held[owner] = keep

    def release(self, owner: str) -> None:
        self.free_blocks += self.held.pop(owner, 0)

    def park(self, owner: str, key: str, tokens: int) -> None:
        """Move `owner`'s first `tokens` tokens of KV into the prefix cache under `key`."""
        have = self.held.pop(owner, 0)
        keep = min(have, self.blocks_for(tokens))
        self.free_blocks += have - keep
        old = self.parked.pop(key, None)
        if old:
            self.free_blocks += old[0]
        if keep:
            self.parked[key] = (keep, min(tokens, keep * self.block_tokens))

    def claim(self, key: str, owner: str, tokens: int) -> int:
        """Give `owner` the parked prefix `key` (up to `tokens` tokens); returns tokens reused."""
        entry = self.parked.pop(key, None)
        if entry is None:
            return 0
        blocks, have = entry
        use = min(have, tokens)
        keep = self.blocks_for(use)
        self.free_blocks += blocks - keep
        self.held[owner] = self.held.get(owner, 0) + keep
        return use

    def drop_parked(self) -> None:
        while self.parked:
            self.free_blocks += self.parked.popitem()[1][0]

    def check(self) -> None:
        used = sum(self.held.values()) + sum(b for b, _ in self.parked.values())
        if used + self.free_blocks != self.total_blocks or self.free_blocks < 0:
            raise AssertionError(f"KV accounting broken: used {used} + free {self.free_blocks} != {self.total_blocks}")
