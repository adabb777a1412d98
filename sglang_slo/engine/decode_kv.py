"""Dense copy of a steady decode batch's keys and values, extended in place each step.

Plain decode over the paged cache gathers every sequence's whole context from scattered
slots, per layer, per step (`paged_attention`). While consecutive iterations decode the same
sequences in the same order, each sequence's keys only grow by its new token, so `DecodeKV`
keeps them in buffers `[layers, B, kv_heads, cap, head_dim]`: a step writes its new K/V there
(and to the paged cache, which stays the source of truth) and attends over a slice of them.
Measured on the 2-layer, 256-hidden shape at 32 sequences x ~130 keys: the 4 gathers a step
saves cost ~1.5 ms of a ~9 ms step (CPU, one thread).

    step = decode_kv.step(rids, context_lens, ctx, k_slots_fn)  # before a pure-decode forward
    batch.dense = step                                           # paged_attention then uses it
    decode_kv.reset()                                            # after any other forward

(`attention.decode_batch` does the first two.)

The copy is valid only across consecutive pure-decode forwards of one runner: a different
set of sequences, or a context that did not grow by exactly the last step's token, rebuilds
it from the paged cache (a gather per layer, as a step without it does, plus a copy into
the buffers). The same set in another order runs in the held order (`order_of`).
"""

from __future__ import annotations

from collections.abc import Callable
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
        self.rids: tuple = ()          # row order of the held copy; () = none held
        self.lens: list[int] = []      # keys held per row (positions 0 .. len-1)
        self.k = self.v = None         # [layers, B_alloc, kv_heads, cap, head_dim]
        self.rebuilds = 0              # copies built from the paged cache (tests, stats)
        self._rows: torch.Tensor | None = None
        self._rows_cap = 0

    def order_of(self, rids: tuple) -> list[int] | None:
        """Permutation putting `rids` in the held row order if they are the held requests in
        another order (decode rows are independent, so the batch can run in that order);
        else None."""
        if rids == self.rids or len(rids) != len(self.rids) or set(rids) != set(self.rids):
            return None
        where = {r: i for i, r in enumerate(rids)}
        return [where[r] for r in self.rids]

    def reset(self) -> None:
        """Forget the held copy (buffers are kept for reuse)."""
        self.rids, self.lens = (), []

    def step(self, rids: tuple, context_lens: list[int], ctx: torch.Tensor,
             k_slots: Callable[[], torch.Tensor]) -> DenseStep | None:
        """Prepare a decode forward of one new token per sequence at `context_lens[i]`.

        rids: sequence identities in batch order; ctx: `context_lens` as a tensor `[B]`;
        k_slots: makes `[B, >= n_k]` int64, the paged slot of each position (called only to
        rebuild). Returns None (gather instead) if the copy would exceed `max_bytes`."""
        n_k = max(context_lens) + 1
        if (self.k is None or rids != self.rids or self.lens != context_lens
                or n_k > self.k.shape[3]):
            if not self._rebuild(rids, context_lens, k_slots(), n_k):
                return None
        b, h, cap = len(rids), self.kv.num_kv_heads, self.k.shape[3]
        mask = None
        if min(context_lens) != n_k - 1:
            # Position n_k-1 is new to shorter rows: make it finite (masked keys must not
            # hold NaN: 0 * NaN = NaN inside SDPA).
            self.k[:, :b, :, n_k - 1].zero_()
            self.v[:, :b, :, n_k - 1].zero_()
            mask = (torch.arange(n_k, device=ctx.device)[None, :] <= ctx[:, None])[:, None, None, :]
        write = (self._head_rows(b, h, cap, ctx.device) + ctx[:, None]).view(-1)
        self.lens = [c + 1 for c in context_lens]
        return DenseStep(self.k, self.v, b, n_k, write, mask)

    def _head_rows(self, b: int, h: int, cap: int, device) -> torch.Tensor:
        """`[B, kv_heads]` flat row of position 0 of each (sequence, head), cached."""
        if self._rows is None or self._rows.shape[0] != b or self._rows_cap != cap:
            self._rows = torch.arange(b * h, device=device).view(b, h) * cap
            self._rows_cap = cap
        return self._rows

    def _rebuild(self, rids: tuple, context_lens: list[int], k_slots: torch.Tensor, n_k: int) -> bool:
        """Copy keys 0 .. n_k-2 of every row from the paged cache (pads included: finite)."""
        kv, b = self.kv, len(rids)
        cap = max(2 * n_k, n_k + 64)  # room to grow before the next rebuild
        shape = (kv.num_layers, b, kv.num_kv_heads, cap, kv.head_dim)
        if 2 * kv.k.element_size() * torch.Size(shape).numel() > self.max_bytes:
            self.reset()
            return False
        if self.k is None or self.k.shape[1] < b or self.k.shape[3] < n_k:
            self.k = torch.empty(shape, dtype=kv.k.dtype, device=kv.k.device)
            self.v = torch.empty(shape, dtype=kv.v.dtype, device=kv.v.device)
        flat = k_slots[:, :n_k - 1].reshape(-1)
        for layer in range(kv.num_layers):
            src_k, src_v = kv.layer_slots(layer)
            for src, dst in ((src_k, self.k), (src_v, self.v)):
                got = src.index_select(0, flat).view(b, n_k - 1, kv.num_kv_heads, kv.head_dim)
                dst[layer, :b, :, :n_k - 1].copy_(got.transpose(1, 2))
        self.rids, self.lens = rids, list(context_lens)
        self.rebuilds += 1
        return True
