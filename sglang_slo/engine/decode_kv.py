"""Dense copy of the decode batch's keys and values, kept up to date incrementally.

Plain decode over the paged cache gathers every sequence's whole context from scattered
slots, per layer, per step (`paged_attention`). `DecodeKV` keeps each decoding sequence's
keys in buffers `[layers, B, kv_heads, cap, head_dim]` instead, one row per sequence: a
step writes its new K/V there (and to the paged cache, which stays the source of truth) and
attends over a slice of them. Measured on the 2-layer, 256-hidden shape at 32 sequences x
~130 keys: the 4 gathers a step saves cost ~1.5 ms of a ~9 ms step (CPU, one thread).

    order = decode_kv.order_of(keys)                   # rows to run the batch in (or None)
    step = decode_kv.step(keys, context_lens, ctx, k_slots_fn)  # before a pure-decode forward
    batch.dense = step                                 # paged_attention then uses it
    decode_kv.reset()                                  # only if a forward using it failed

(`attention.decode_batch` does the `step` part.)

A row stays valid while its sequence lives: keys below a sequence's committed length never
change (prefill chunks, verify trees and their KV moves only write positions at or past it),
so the copy survives other forwards (prefill chunks, speculative verifies) and membership
changes. Each step brings the rows up to date from the paged cache with only what is
missing: positions a sequence committed since its row was last written (e.g. tokens a
verify accepted), whole rows for sequences that joined; a leaving sequence's row is taken
by a joiner or filled by moving the last row into it. Callers make keys unique per sequence
lifetime (the runner uses request id, object and preemption count: a preempted request is
recomputed, a reused id is another request). Before this, any change rebuilt the whole copy
(a gather per layer of every row): 1.6-3.5 ms per plain decode step after a prefill or
verify at 10-20 sequences on the tiny pair, ~20-25% of the step.

Masked keys must be finite (0 * NaN = NaN inside SDPA): every row is finite on columns
`[0, width)`; columns past it are zeroed before they are first attended, and a row given to
a new sequence is zeroed past that sequence's keys (a NaN left by an errored request never
leaks).
"""

from __future__ import annotations

from collections.abc import Callable, Container, Hashable, Sequence
from dataclasses import dataclass

import torch

from sglang_slo.engine.kv_cache import KVCache

MAX_BYTES = 1 << 29
"""Largest dense copy (K and V, all layers) kept, bytes; larger batches gather each step."""


@dataclass(slots=True)
class DenseStep:
    """One forward's share of a `DecodeKV`: where new K/V go, which keys are read."""

    k: torch.Tensor            # [layers, B_alloc, kv_heads, cap, head_dim] (shared buffer)
    v: torch.Tensor
    rows: int                  # B, sequences in the batch (rows 0..B-1)
    num_keys: int              # n_k = max context + 1, keys attended per row
    write_index: torch.Tensor  # [B * kv_heads] int64, flat row of each new (sequence, head)
    mask: torch.Tensor | None  # [B, 1, 1, n_k] bool, keys of each row; None = all (equal lengths)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new tokens' K/V `[B, kv_heads, head_dim]` of one layer."""
        d = k.shape[-1]
        self.k[layer].view(-1, d).index_copy_(0, self.write_index, k.reshape(-1, d).to(self.k.dtype))
        self.v[layer].view(-1, d).index_copy_(0, self.write_index, v.reshape(-1, d).to(self.v.dtype))

    def keys(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer as `[B, kv_heads, n_k, head_dim]` views."""
        return (self.k[layer, :self.rows, :, :self.num_keys],
                self.v[layer, :self.rows, :, :self.num_keys])


class DecodeKV:
    """The dense copy (see the module docstring); one per paged cache."""

    def __init__(self, kv: KVCache, max_bytes: int = MAX_BYTES) -> None:
        self.kv = kv
        self.max_bytes = max_bytes
        self.rids: tuple = ()          # key of each held row, row order; () = none held
        self.lens: list[int] = []      # keys held per row (positions 0 .. len-1)
        self.width = 0                 # every held row is finite on columns [0, width)
        self.k = self.v = None         # [layers, B_alloc, kv_heads, cap, head_dim]
        # Statistics (tests, benchmarks): whole rows filled from the paged cache, and all
        # positions copied from it (whole rows and catch-ups).
        self.rows_filled = 0
        self.tokens_copied = 0
        self._rows: torch.Tensor | None = None
        self._rows_cap = 0

    def order_of(self, rids: Sequence[Hashable]) -> list[int] | None:
        """Row order for a batch of `rids`: `order[j]` is the index in `rids` of the sequence
        to run in row j (decode rows are independent, so the batch can run in any order), or
        None to run `rids` as given. Held sequences keep their rows; joiners take the rows of
        leavers, then new rows; if more left than joined, the last rows move down."""
        rids = tuple(rids)
        if rids == self.rids or not self.rids:
            return None
        where = {r: i for i, r in enumerate(rids)}
        b = len(rids)
        slots: list[int | None] = [where.get(r) for r in self.rids]  # per held row: batch index
        kept = {i for i in slots if i is not None}
        joiners = [i for i in range(b) if i not in kept]
        if not kept:
            return None  # nothing to keep: a fresh fill in the given order
        free = [j for j, i in enumerate(slots) if i is None]
        for j in free:
            if not joiners:
                break
            slots[j] = joiners.pop(0)
        slots += joiners
        # More leavers than joiners: holes below b take the last rows (moved by `step`).
        while len(slots) > b or None in slots[:b]:
            last = slots.pop()
            if last is not None:
                slots[slots.index(None)] = last
        return None if slots == list(range(b)) else slots

    def admit(self, rids: Sequence[Hashable], context_lens: list[int],
              k_slots: Callable[[int], torch.Tensor], alive: Container | None = None) -> int:
        """Give sequences that will decode next (e.g. whose prefill just completed) rows now,
        filled with keys 0 .. context_lens[i]-1, so that their first decode step does not
        pay the copy (the forward that made the keys does, as per-token work). They take
        the rows of held keys not in `alive` (finished, preempted), then new rows; other held
        rows stay as they are. k_slots(n): `[len(rids), >= n]` paged slots of positions
        0..n-1. Returns the rows filled (0 if the copy would be too big)."""
        held = set(self.rids)
        pick = [i for i, r in enumerate(rids) if r not in held and context_lens[i] > 0]
        if not pick:
            return 0
        keys, lens = list(self.rids), list(self.lens)
        dead = [j for j, r in enumerate(keys) if alive is not None and r not in alive]
        rows = []  # row of each picked sequence
        for i in pick:
            if dead:
                j = dead.pop(0)
                keys[j], lens[j] = rids[i], context_lens[i]
            else:
                j = len(keys)
                keys.append(rids[i])
                lens.append(context_lens[i])
            rows.append(j)
        n_k = max(lens) + 1

        def slots() -> torch.Tensor:  # rows not picked copy nothing: any slot will do
            got = k_slots(n_k)[torch.tensor(pick, dtype=torch.int64, device=self.kv.k.device)]
            out = got.new_zeros(len(keys), got.shape[1])
            out[torch.tensor(rows, dtype=torch.int64, device=got.device)] = got
            return out

        return len(pick) if self._update(tuple(keys), lens, slots, n_k) else 0

    def reset(self) -> None:
        """Forget the held copy (buffers are kept for reuse)."""
        self.rids, self.lens, self.width = (), [], 0

    def step(self, rids: Sequence[Hashable], context_lens: list[int], ctx: torch.Tensor,
             k_slots: Callable[[], torch.Tensor]) -> DenseStep | None:
        """Prepare a decode forward of one new token per sequence at `context_lens[i]`.

        rids: sequence keys in batch (row) order, best `order_of`'s; ctx: `context_lens` as a
        tensor `[B]`; k_slots: makes `[B, >= n_k]` int64, the paged slot of each position
        (called only if positions must be copied). Returns None (gather instead) if the copy
        would exceed `max_bytes`."""
        rids = tuple(rids)
        n_k = max(context_lens) + 1
        if not (rids == self.rids and self.lens == context_lens and self.k is not None
                and n_k <= self.k.shape[3]):
            if not self._update(rids, context_lens, k_slots, n_k):
                return None
        b, h, cap = len(rids), self.kv.num_kv_heads, self.k.shape[3]
        mask = None
        if min(context_lens) != n_k - 1:
            if n_k > self.width:
                # Columns new to shorter rows: make them finite (no row holds keys there).
                self.k[:, :b, :, self.width:n_k].zero_()
                self.v[:, :b, :, self.width:n_k].zero_()
            mask = (torch.arange(n_k, device=ctx.device)[None, :] <= ctx[:, None])[:, None, None, :]
        self.width = max(self.width, n_k)
        write = (self._head_rows(b, h, cap, ctx.device) + ctx[:, None]).view(-1)
        self.lens = [c + 1 for c in context_lens]
        return DenseStep(self.k, self.v, b, n_k, write, mask)

    def _head_rows(self, b: int, h: int, cap: int, device) -> torch.Tensor:
        """`[B, kv_heads]` flat row of position 0 of each (sequence, head), cached."""
        if self._rows is None or self._rows.shape[0] != b or self._rows_cap != cap:
            self._rows = torch.arange(b * h, device=device).view(b, h) * cap
            self._rows_cap = cap
        return self._rows

    def _update(self, rids: tuple, context_lens: list[int], k_slots: Callable[[], torch.Tensor],
                n_k: int) -> bool:
        """Bring rows 0..B-1 to hold `rids`' keys 0 .. context_lens[i]-1: keep, move, catch up
        or fill each row (see the module docstring). False (and nothing held) if too big."""
        b = len(rids)
        held = {r: (j, n) for j, (r, n) in enumerate(zip(self.rids, self.lens))}
        # Per row: the held row its keys come from (None: fill from position 0), and the
        # first position to copy from the paged cache.
        src: list[int | None] = []
        start: list[int] = []
        for r, c in zip(rids, context_lens):
            j, n = held.get(r, (None, 0))
            if j is None or n > c:  # new here (or shorter than held: not the same keys)
                src.append(None)
                start.append(0)
            else:
                src.append(j)
                start.append(n)
        if not self._ensure_capacity(b, n_k):
            return False
        width = self.width
        moves = [(j, s) for j, s in enumerate(src) if s is not None and s != j]
        if moves:  # rows of held sequences that changed row (`order_of`: into leavers' rows)
            w = max(width, 1)
            if {j for j, _ in moves} & {s for _, s in moves}:  # a chain or cycle: copy sources first
                src_i = torch.tensor([s for _, s in moves], dtype=torch.int64, device=self.k.device)
                saved = [buf.index_select(1, src_i) for buf in (self.k, self.v)]  # contiguous: fast
                for buf, got in zip((self.k, self.v), saved):
                    for i, (j, _) in enumerate(moves):
                        buf[:, j, :, :w].copy_(got[:, i, :, :w])
            else:
                # Row slices are [layers x kv_heads] runs of w * head_dim contiguous values:
                # plain copies (index_select/index_copy_ over a column-sliced view were ~1 ms
                # per row).
                for buf in (self.k, self.v):
                    for j, s in moves:
                        buf[:, j, :, :w].copy_(buf[:, s, :, :w])
        new = [j for j, s in enumerate(src) if s is None]
        if n_k > width:
            # Columns [width, n_k) hold no keys of held rows: make them finite (keys are copied
            # over them below).
            if not new:
                self.k[:, :b, :, width:n_k].zero_()
                self.v[:, :b, :, width:n_k].zero_()
            else:
                for j, s in enumerate(src):
                    if s is not None:
                        self.k[:, j, :, width:n_k].zero_()
                        self.v[:, j, :, width:n_k].zero_()
        for j in new:  # a row given to another sequence: finite past its keys
            self.k[:, j, :, context_lens[j]:max(n_k, width)].zero_()
            self.v[:, j, :, context_lens[j]:max(n_k, width)].zero_()
        copy = sum(c - s for c, s in zip(context_lens, start))
        if copy:
            self._copy_from_paged(k_slots(), start, context_lens, n_k)
        self.rows_filled += len(new)
        self.tokens_copied += copy
        self.rids, self.lens, self.width = rids, list(context_lens), max(width, n_k)
        return True

    def _ensure_capacity(self, b: int, n_k: int) -> bool:
        """Buffers with >= b rows and >= n_k + 1 columns (held rows copied over if they are
        reallocated); False, and nothing held, if that exceeds `max_bytes`."""
        kv = self.kv
        if self.k is not None and self.k.shape[1] >= b and self.k.shape[3] >= n_k:
            return True
        old_b, w = len(self.rids), self.width
        cap = max(2 * n_k, n_k + 64, w)  # room to grow before the next reallocation
        rows = max(b, self.k.shape[1] if self.k is not None else 0)
        for want in (rows + max(4, rows // 4), rows):  # headroom for joiners, if it fits
            shape = (kv.num_layers, want, kv.num_kv_heads, cap, kv.head_dim)
            if 2 * kv.k.element_size() * torch.Size(shape).numel() <= self.max_bytes:
                break
        else:
            self.reset()
            return False
        k = torch.empty(shape, dtype=kv.k.dtype, device=kv.k.device)
        v = torch.empty(shape, dtype=kv.v.dtype, device=kv.v.device)
        if old_b and w:
            k[:, :old_b, :, :w].copy_(self.k[:, :old_b, :, :w])
            v[:, :old_b, :, :w].copy_(self.v[:, :old_b, :, :w])
        self.k, self.v = k, v
        return True

    def _copy_from_paged(self, k_slots: torch.Tensor, start: list[int], context_lens: list[int],
                         n_k: int) -> None:
        """Copy positions start[i] .. context_lens[i]-1 of every row i from the paged cache."""
        kv, dev = self.kv, self.k.device
        h, cap, d = kv.num_kv_heads, self.k.shape[3], kv.head_dim
        pos = torch.arange(n_k - 1, device=dev)
        lo = torch.tensor(start, dtype=torch.int64, device=dev)
        hi = torch.tensor(context_lens, dtype=torch.int64, device=dev)
        row, p = ((pos[None, :] >= lo[:, None]) & (pos[None, :] < hi[:, None])).nonzero(as_tuple=True)
        slots = k_slots[:, :n_k - 1][row, p]                                    # [m]
        # Flat row of (row, head, position) in one layer's [B_alloc * h * cap, d] view.
        dst = ((row[:, None] * h + torch.arange(h, device=dev)[None, :]) * cap + p[:, None]).reshape(-1)
        for layer in range(kv.num_layers):
            src_k, src_v = kv.layer_slots(layer)                                # [slots, h, d]
            self.k[layer].view(-1, d).index_copy_(0, dst, src_k.index_select(0, slots).reshape(-1, d))
            self.v[layer].view(-1, d).index_copy_(0, dst, src_v.index_select(0, slots).reshape(-1, d))
