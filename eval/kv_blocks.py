"""KV cache accounting of the simulated engine: fixed-size blocks, per-owner counts.

Owners are request ids. A finished agent-loop call *parks* its blocks under its session
key (a prefix cache entry). Parked entries stay resident but evictable, least recently
used first, whenever an allocation would otherwise fail (SGLang's radix cache).

The session's next call *reserves* the entry on arrival: nothing is pinned while it
waits, so the entry still counts as free memory and may be evicted for others (the
`on_claim_lost(owner)` callback then tells the simulator that the call must prefill its
whole prompt). The entry is pinned (moved to the owner) only by the owner's first
successful `grow`, i.e. when the scheduler admits it.
Invariant: free + held + parked == total blocks (checked by `check()`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable


class KvBlocks:
    def __init__(self, capacity_tokens: int, block_tokens: int,
                 on_claim_lost: Callable[[str], None] | None = None):
        """on_claim_lost(owner): called when `owner`'s reserved prefix is evicted before it ran."""
        if capacity_tokens < block_tokens or block_tokens < 1:
            raise ValueError(f"bad KV geometry: {capacity_tokens} tokens in blocks of {block_tokens}")
        self.block_tokens = block_tokens
        self.total_blocks = capacity_tokens // block_tokens
        self.free_blocks = self.total_blocks
        self.held: dict[str, int] = {}  # owner -> blocks
        self.parked: OrderedDict[str, tuple[int, int]] = OrderedDict()  # key -> (blocks, tokens), LRU first
        self.parked_blocks = 0  # sum of the parked entries' blocks
        self.claims: dict[str, tuple[str, int]] = {}  # owner -> (parked key, tokens it will reuse)
        self.claimant: dict[str, str] = {}  # parked key -> owner that reserved it
        self.on_claim_lost = on_claim_lost
        self.peak_used_blocks = 0
        self.evictions = 0
        self.claims_pinned = 0
        """Reserved prefixes still resident when their owner was admitted (prefix hits)."""
        self.claim_tokens_pinned = 0
        self.claims_lost = 0
        """Reserved prefixes evicted before their owner was admitted (recomputed)."""

    def blocks_for(self, tokens: int) -> int:
        return -(-max(0, tokens) // self.block_tokens)

    @property
    def free_tokens(self) -> int:
        """Tokens allocatable now (parked prefixes count as free: they are evictable)."""
        return (self.free_blocks + self.parked_blocks) * self.block_tokens

    def _need(self, owner: str, tokens: int) -> tuple[int, int]:
        """(blocks `owner` still needs for `tokens`, blocks it could get): its reserved
        prefix counts as its own and is not evictable for it."""
        need = self.blocks_for(tokens) - self.held.get(owner, 0)
        avail = self.free_blocks + self.parked_blocks
        claim = self.claims.get(owner)
        if claim is not None:
            keep = self.blocks_for(claim[1])
            need -= keep
            avail -= keep
        return need, avail

    def can_grow(self, owner: str, tokens: int) -> bool:
        """Whether `grow(owner, tokens)` would succeed (evicting parked prefixes if needed)."""
        need, avail = self._need(owner, tokens)
        return need <= avail

    def grow(self, owner: str, tokens: int) -> bool:
        """Make `owner` hold enough blocks for `tokens` tokens (pinning its reserved prefix
        first); False (nothing changed) if impossible."""
        need, avail = self._need(owner, tokens)
        if need > avail:
            return False
        claim = self.claims.pop(owner, None)
        if claim is not None:
            self._pin(owner, *claim)
        need = self.blocks_for(tokens) - self.held.get(owner, 0)
        if need <= 0:
            return True
        while need > self.free_blocks:
            self._evict_lru()
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
        """Free `owner`'s blocks and drop its reservation (the prefix stays parked)."""
        self.free_blocks += self.held.pop(owner, 0)
        claim = self.claims.pop(owner, None)
        if claim is not None:
            self.claimant.pop(claim[0], None)

    def park(self, owner: str, key: str, tokens: int) -> None:
        """Move `owner`'s first `tokens` tokens of KV into the prefix cache under `key` (most recent)."""
        have = self.held.pop(owner, 0)
        keep = min(have, self.blocks_for(tokens))
        self.free_blocks += have - keep
        if key in self.parked:
            self._drop(key)
        if keep:
            self.parked[key] = (keep, min(tokens, keep * self.block_tokens))
            self.parked_blocks += keep

    def reserve(self, key: str, owner: str, tokens: int) -> int:
        """`owner` (waiting) will reuse up to `tokens` tokens of the parked prefix `key` if it
        is still resident when admitted; returns those tokens (0: nothing resident). Nothing
        is pinned; the entry becomes most recently used."""
        entry = self.parked.get(key)
        use = min(entry[1], tokens) if entry is not None else 0
        if use <= 0:
            return 0
        self.parked.move_to_end(key)
        prev = self.claimant.get(key)
        if prev is not None and prev != owner:  # one waiting call per entry: the earlier one loses it
            self.claims.pop(prev, None)
            self._lost(prev)
        self.release_claim(owner)
        self.claims[owner] = (key, use)
        self.claimant[key] = owner
        return use

    def release_claim(self, owner: str) -> None:
        claim = self.claims.pop(owner, None)
        if claim is not None:
            self.claimant.pop(claim[0], None)

    def _pin(self, owner: str, key: str, tokens: int) -> None:
        blocks, _ = self.parked.pop(key)
        self.parked_blocks -= blocks
        del self.claimant[key]
        keep = min(blocks, self.blocks_for(tokens))
        self.free_blocks += blocks - keep
        self.held[owner] = self.held.get(owner, 0) + keep
        self.claims_pinned += 1
        self.claim_tokens_pinned += tokens

    def _drop(self, key: str) -> None:
        """Free the parked entry `key`; a waiting owner that reserved it loses it."""
        blocks, _ = self.parked.pop(key)
        self.parked_blocks -= blocks
        self.free_blocks += blocks
        owner = self.claimant.pop(key, None)
        if owner is not None:
            del self.claims[owner]
            self._lost(owner)

    def _lost(self, owner: str) -> None:
        self.claims_lost += 1
        if self.on_claim_lost is not None:
            self.on_claim_lost(owner)

    def _evict_lru(self) -> None:
        self._drop(next(iter(self.parked)))
        self.evictions += 1

    def drop_parked(self) -> None:
        while self.parked:
            self._drop(next(iter(self.parked)))

    def check(self) -> None:
        parked = sum(b for b, _ in self.parked.values())
        used = sum(self.held.values()) + parked
        if (used + self.free_blocks != self.total_blocks or self.free_blocks < 0 or parked != self.parked_blocks
                or any(self.claimant.get(k) != o for o, (k, _) in self.claims.items())
                or len(self.claimant) != len(self.claims)):
            raise AssertionError(f"KV accounting broken: used {used} + free {self.free_blocks} != {self.total_blocks}"
                                 f" (parked {parked} vs {self.parked_blocks}, {len(self.claims)} claims)")
