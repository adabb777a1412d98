"""Attention over a paged KV cache for one ragged batch of prefill, decode and tree tokens.

The batch is flat: `T` new tokens, sequence after sequence. Each sequence contributes
`query_len` new tokens after `context_len` tokens already in the cache, and is one of:

- a prefill chunk: causal among the new tokens (`tree_mask=None`, query_len >= 1);
- a decode token: the same with query_len == 1;
- a verify tree: `tree_mask [q, q]` bool, `mask[i, j]` true iff new token j is token i or an
  ancestor of it; its positions are `context_len + depth` (see `AttentionBatch.positions`).

All new tokens attend to the sequence's whole cached context. Their K/V are written to
`new_slots` (default: the slots of positions `context_len .. context_len + query_len - 1`
in the block table) before attention, so they are also keys for one another.

Build the metadata once per forward; every layer reuses it:

    batch = AttentionBatch.build([
        SequenceInput(block_table=t0, context_len=0, query_len=37),              # prefill
        SequenceInput(block_table=t1, context_len=120, query_len=1),             # decode
        SequenceInput(block_table=t2, context_len=80, query_len=5, tree_mask=m), # verify tree
    ], block_size=kv.block_size, device=kv.k.device)
    hidden = model.forward(input_ids, batch.positions, batch, kv)    # [T, hidden]

CPU (and CUDA without FlashInfer): torch SDPA with explicit boolean masks. Sequences are
grouped so that padding stays small (decode tokens are not padded to a prefill chunk's
length); each group gathers its keys from the cache with one index per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sglang_slo.engine.decode_kv import DecodeKV, DenseStep
from sglang_slo.engine.kv_cache import KVCache, blocks_needed


@dataclass(slots=True)
class SequenceInput:
    """One sequence's share of a ragged batch."""

    block_table: Sequence[int]
    """Block ids of the sequence, covering its context (and new tokens if `new_slots` is None)."""
    context_len: int
    """Tokens of this sequence already in the cache (keys read from the block table)."""
    query_len: int
    """New tokens of this sequence in this forward (>= 1)."""
    tree_mask: torch.Tensor | None = None
    """`[query_len, query_len]` bool ancestor-or-self mask for a verify tree; None = causal."""
    new_slots: Sequence[int] | None = None
    """Slots that receive the new tokens' K/V; None = positions context_len.. in the table."""


@dataclass(slots=True)
class AttentionGroup:
    """Sequences attended together as one padded SDPA call (built by AttentionBatch)."""

    q_index: torch.Tensor     # [B, Q] int64, row of each padded query in the flat batch
    k_slots: torch.Tensor     # [B, K] int64, cache slot of each padded key
    mask: torch.Tensor | None  # [B, 1, Q, K] bool (True = attend); None = attend to all
    out_rows: torch.Tensor    # [n] int64, rows of the flattened [B*Q] output that are real
    flat_rows: torch.Tensor   # [n] int64, their rows in the flat batch


@dataclass(slots=True)
class AttentionBatch:
    """Attention metadata for one forward; see the module docstring."""

    slot_mapping: torch.Tensor    # [T] int64, where each new token's K/V is written
    positions: torch.Tensor       # [T] int64, natural positions (context + index, or + depth)
    query_starts: list[int]       # per sequence, first row in the flat batch
    query_lens: list[int]         # per sequence
    context_lens: list[int]       # per sequence
    groups: list[AttentionGroup]
    identity_order: bool          # one group, no padding, rows in flat order
    dense: DenseStep | None = None
    """Pure decode only: attend over this dense copy of the keys instead of gathering them
    (`decode_kv.py`); `groups` is then empty."""

    @property
    def num_tokens(self) -> int:
        """T, new tokens in the batch."""
        return int(self.slot_mapping.numel())

    @property
    def last_rows(self) -> list[int]:
        """Flat row of each sequence's last new token (where next-token logits come from)."""
        return [s + n - 1 for s, n in zip(self.query_starts, self.query_lens)]

    @classmethod
    def build(cls, seqs: Sequence[SequenceInput], block_size: int,
              device: str | torch.device = "cpu") -> AttentionBatch:
        """Validate the sequences and precompute slots, positions, groups and masks."""
        if not seqs:
            raise ValueError("empty batch")
        starts: list[int] = []
        slots: list[int] = []       # flat, all new tokens
        positions: list[int] = []
        new_slots: list[list[int] | None] = []  # explicit new_slots per sequence
        t = 0
        for i, s in enumerate(seqs):
            q, c = s.query_len, s.context_len
            if q < 1 or c < 0:
                raise ValueError(f"sequence {i}: query_len {q} must be >= 1, context_len {c} >= 0")
            if s.tree_mask is not None and tuple(s.tree_mask.shape) != (q, q):
                raise ValueError(f"sequence {i}: tree_mask shape {tuple(s.tree_mask.shape)} "
                                 f"!= ({q}, {q})")
            covered = c if s.new_slots is not None else c + q
            if blocks_needed(covered, block_size) > len(s.block_table):
                raise ValueError(f"sequence {i}: {len(s.block_table)} blocks cannot hold "
                                 f"{covered} tokens (block_size {block_size})")
            if s.new_slots is not None:
                if len(s.new_slots) != q:
                    raise ValueError(f"sequence {i}: {len(s.new_slots)} new_slots for {q} tokens")
                new_slots.append([int(x) for x in s.new_slots])
                slots += new_slots[-1]
            else:
                new_slots.append(None)
                table = s.block_table
                slots += [table[p // block_size] * block_size + p % block_size
                          for p in range(c, c + q)]
            if s.tree_mask is None:
                positions += range(c, c + q)
            else:
                m = s.tree_mask.to(torch.bool).cpu()
                if not bool(m.diagonal().all()):
                    raise ValueError(f"sequence {i}: tree_mask must be true on the diagonal")
                positions += [c + d - 1 for d in m.sum(-1).tolist()]  # depth = proper ancestors
            starts.append(t)
            t += q
        order = _group_sequences(seqs)
        groups = [_build_group([seqs[j] for j in g], [starts[j] for j in g],
                               [new_slots[j] for j in g], block_size, device)
                  for g in order]
        identity = (len(order) == 1 and order[0] == list(range(len(seqs)))
                    and len({s.query_len for s in seqs}) == 1)
        return cls(slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
                   positions=torch.tensor(positions, dtype=torch.int64, device=device),
                   query_starts=starts, query_lens=[s.query_len for s in seqs],
                   context_lens=[s.context_len for s in seqs], groups=groups,
                   identity_order=identity)


def position_slots(block_tables: Sequence[Sequence[int]], num_positions: int, block_size: int,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """Cache slot of positions 0 .. num_positions-1 of each sequence: [B, num_positions] int64.

    Tables shorter than needed are padded with block 0 (the engine's null block)."""
    n_blocks = max(blocks_needed(num_positions, block_size), 1)
    tables = torch.tensor([list(t[:n_blocks]) + [0] * (n_blocks - len(t)) for t in block_tables],
                          dtype=torch.int64)                                   # [B, blocks]
    pos = torch.arange(num_positions)
    return (tables[:, pos // block_size] * block_size + pos % block_size).to(device)


def decode_step_batch(slots: torch.Tensor, context_lens: list[int]) -> AttentionBatch:
    """Batch of one new token per sequence at position `context_lens[i]` (causal decode).

    `slots` [B, P] from `position_slots` (P > max context). Tensor ops only, no per-sequence
    Python: the per-step metadata of draft chains, equal to what `AttentionBatch.build`
    makes for the same sequences with query_len 1.
    """
    b, dev = len(context_lens), slots.device
    ctx = torch.tensor(context_lens, dtype=torch.int64, device=dev)            # [B]
    n_k = max(context_lens) + 1
    rows = torch.arange(b, device=dev)
    mask = None
    if min(context_lens) != n_k - 1:  # unequal lengths: hide each row's keys past its token
        mask = (torch.arange(n_k, device=dev)[None, :] <= ctx[:, None])[:, None, None, :]  # [B,1,1,K]
    group = AttentionGroup(q_index=rows[:, None], k_slots=slots[:, :n_k].contiguous(), mask=mask,
                           out_rows=rows, flat_rows=rows)
    return AttentionBatch(slot_mapping=slots.gather(1, ctx[:, None])[:, 0], positions=ctx,
                          query_starts=list(range(b)), query_lens=[1] * b,
                          context_lens=list(context_lens), groups=[group], identity_order=True)


def decode_batch(block_tables: Sequence[Sequence[int]], context_lens: list[int], block_size: int,
                 decode_kv: DecodeKV, rids: tuple, device: str | torch.device = "cpu") -> AttentionBatch:
    """Batch of one new token per sequence at position `context_lens[i]` (plain decode),
    attending over `decode_kv`'s dense copy (rows in `rids` order); the metadata of
    `decode_step_batch` if the copy is too big. Python over B ints plus ~4 small tensor ops."""
    b = len(context_lens)
    new = [t[c // block_size] * block_size + c % block_size for t, c in zip(block_tables, context_lens)]
    ctx = torch.tensor(context_lens, dtype=torch.int64, device=device)  # [B]
    n_k = max(context_lens) + 1
    dense = decode_kv.step(rids, context_lens, ctx,
                           lambda: position_slots(block_tables, n_k, block_size, device))
    if dense is None:
        return decode_step_batch(position_slots(block_tables, n_k, block_size, device), context_lens)
    return AttentionBatch(slot_mapping=torch.tensor(new, dtype=torch.int64, device=device), positions=ctx,
                          query_starts=list(range(b)), query_lens=[1] * b,
                          context_lens=list(context_lens), groups=[], identity_order=True, dense=dense)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttentionBatch,
                    kv: KVCache, layer: int, scale: float) -> torch.Tensor:
    """Write new K/V to the cache, then attend.

    q: [T, heads, head_dim]; k, v: [T, kv_heads, head_dim]. Returns [T, heads * head_dim].
    """
    kv.write(layer, batch.slot_mapping, k, v)
    num_heads, head_dim = q.shape[1], q.shape[2]
    gqa = num_heads != k.shape[1]
    if batch.dense is not None:
        return _decode_kv_attention(q, k, v, batch, layer, scale, gqa)
    k_cache, v_cache = kv.layer_slots(layer)  # [slots, kv_heads, head_dim]
    outs = []
    for g in batch.groups:
        # index_select on flat indices: several times cheaper on CPU than 2-D advanced indexing
        b, n_q = g.q_index.shape
        n_k = g.k_slots.shape[1]
        if batch.identity_order:
            qg = q.view(b, n_q, num_heads, head_dim).transpose(1, 2)  # [B, heads, Q, head_dim]
        else:
            qg = q.index_select(0, g.q_index.view(-1)).view(b, n_q, num_heads, head_dim).transpose(1, 2)
        flat = g.k_slots.reshape(-1)  # [B*K]
        kg = k_cache.index_select(0, flat).view(b, n_k, -1, head_dim).transpose(1, 2)  # [B, kv_heads, K, hd]
        vg = v_cache.index_select(0, flat).view(b, n_k, -1, head_dim).transpose(1, 2)
        og = F.scaled_dot_product_attention(qg, kg.to(q.dtype), vg.to(q.dtype), attn_mask=g.mask,
                                            scale=scale, enable_gqa=gqa)
        # [B, heads, Q, head_dim] -> [B*Q, heads*head_dim]
        outs.append(og.transpose(1, 2).reshape(-1, num_heads * head_dim))
    if batch.identity_order:
        return outs[0]
    out = q.new_empty(q.shape[0], num_heads * head_dim)
    for g, og in zip(batch.groups, outs):
        out.index_copy_(0, g.flat_rows, og.index_select(0, g.out_rows))
    return out


def _decode_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttentionBatch,
                         layer: int, scale: float, gqa: bool) -> torch.Tensor:
    """One query per sequence (q [B, heads, head_dim]) over `batch.dense`: no gather."""
    d = batch.dense
    d.write(layer, k, v)
    kg, vg = d.keys(layer)  # [B, kv_heads, n_k, head_dim]
    b, heads, hd = q.shape
    kvh = kg.shape[1]
    if b * kg.shape[2] < 512:  # small: SDPA's one call beats four ops' overhead
        o = F.scaled_dot_product_attention(q.unsqueeze(2), kg.to(q.dtype), vg.to(q.dtype),
                                           attn_mask=d.mask, scale=scale, enable_gqa=gqa)
        return o.reshape(b, -1)  # [B, heads, 1, head_dim] -> [B, heads * head_dim]
    # One query per row: two batched matmuls with the query heads of a KV head stacked
    # ([B, kv_heads, group, n_k] scores), not SDPA, whose GQA path is slow on CPU: per layer
    # (6 heads, 2 KV heads, head_dim 32; one thread) B=12 x 200 keys 130 vs 202 us, B=32 x 64
    # 129 vs 212 us, B=4 x 200 56 vs 72 us; B=1 x 64 24 vs 15 us (hence SDPA below 512 keys).
    qg = q.view(b, kvh, heads // kvh, hd)
    scores = torch.matmul(qg, kg.to(q.dtype).transpose(-1, -2)) * scale
    if d.mask is not None:  # [B, 1, 1, n_k]: keys past a row's own length
        scores = scores.masked_fill(~d.mask, float("-inf"))
    o = torch.matmul(torch.softmax(scores, dim=-1), vg.to(q.dtype))  # [B, kv_heads, group, head_dim]
    return o.reshape(b, heads * hd)


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """Plain causal attention without a cache (training, reference checks).

    q: [B, L, heads, head_dim]; k, v: [B, L, kv_heads, head_dim]. Returns [B, L, heads*head_dim].
    """
    b, n, h, d = q.shape
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, scale=scale, enable_gqa=h != k.shape[2])
    return o.transpose(1, 2).reshape(b, n, h * d)


def _group_sequences(seqs: Sequence[SequenceInput]) -> list[list[int]]:
    """Split sequences into groups whose padded [Q x K] area stays near the real one.

    Greedy over sequences sorted by (query_len, keys): a sequence joins the current group
    while padded area <= 1.5 x real area + 4096 (small groups are cheaper merged than split).
    """
    order = sorted(range(len(seqs)), key=lambda i: (seqs[i].query_len,
                                                    seqs[i].context_len + seqs[i].query_len))
    groups: list[list[int]] = []
    cur: list[int] = []
    real = max_q = max_k = 0
    for i in order:
        q, kk = seqs[i].query_len, seqs[i].context_len + seqs[i].query_len
        n_q, n_k, n_real = max(max_q, q), max(max_k, kk), real + q * kk
        if cur and (len(cur) + 1) * n_q * n_k > 1.5 * n_real + 4096:
            groups.append(cur)
            cur, real, max_q, max_k = [], 0, 0, 0
            n_q, n_k, n_real = q, kk, q * kk
        cur.append(i)
        real, max_q, max_k = n_real, n_q, n_k
    groups.append(cur)
    return groups


def _build_group(seqs: list[SequenceInput], starts: list[int],
                 new_slots: list[list[int] | None], block_size: int,
                 device: str | torch.device) -> AttentionGroup:
    b = len(seqs)
    q_lens_l = [s.query_len for s in seqs]
    ctx_l = [s.context_len for s in seqs]
    n_q = max(q_lens_l)
    n_k = max(c + q for c, q in zip(ctx_l, q_lens_l))
    q_lens, ctx = torch.tensor(q_lens_l), torch.tensor(ctx_l)
    # Keys: positions 0 .. context + query - 1 through the (zero-padded) block tables; a
    # sequence with explicit new_slots gets those for its new tokens.
    max_blocks = max(blocks_needed(n_k, block_size), 1)
    tables = torch.tensor([list(s.block_table[:max_blocks]) + [0] * (max_blocks - len(s.block_table))
                           for s in seqs], dtype=torch.int64)                   # [B, blocks]
    kpos = torch.arange(n_k)
    k_slots = tables[:, kpos // block_size] * block_size + kpos % block_size   # [B, K]
    for i, ns in enumerate(new_slots):
        if ns is not None:
            k_slots[i, ctx_l[i]:ctx_l[i] + q_lens_l[i]] = torch.tensor(ns, dtype=torch.int64)
    # Causal rule: query i of a sequence sees keys up to context + i (pads never seen by
    # real queries; padded queries see something, so no row is all-masked -> no NaN).
    qpos = torch.arange(n_q)
    if n_q == 1 and len(set(ctx_l)) == 1:
        mask = None  # equal-length decode tokens see every key
    else:
        mask = kpos[None, None, :] <= (ctx[:, None, None] + qpos[None, :, None])  # [B, Q, K]
        for i, s in enumerate(seqs):
            if s.tree_mask is not None:
                c, q = s.context_len, s.query_len
                mask[i, :q, c:c + q] = s.tree_mask.to(torch.bool).cpu()
        mask = mask[:, None].to(device)
    q_index = torch.tensor(starts)[:, None] + torch.minimum(qpos[None, :], q_lens[:, None] - 1)
    valid = qpos[None, :] < q_lens[:, None]                                    # [B, Q]
    out_rows = valid.reshape(-1).nonzero().squeeze(1)
    flat_rows = q_index.reshape(-1)[out_rows]
    return AttentionGroup(q_index=q_index.to(device), k_slots=k_slots.to(device), mask=mask,
                          out_rows=out_rows.to(device), flat_rows=flat_rows.to(device))
