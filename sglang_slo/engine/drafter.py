"""Runs the draft model for `spec.tree.build_trees`: the `draft_step` callback over a paged cache.

Step 0 feeds each speculating request's pending tokens (committed tokens the draft cache
lacks, ending with the root) causally and returns the root's next-token log-probs. Step
s >= 1 feeds the frontier nodes (depth s) of every request in one batched forward.

Draft cache layout of a request with N committed tokens (root at position N-1):

    [ committed 0..N-1 | tree node 1 | tree node 2 | ... ]     node v at position N + v - 1

`build_trees` numbers nodes level by level, so levels 1..d-1 (the ones ever fed) occupy
positions N .. N + (d-1)*w - 1 (the scheduler reserves exactly that). A frontier node attends
to the committed context and to its own ancestors only, which `AttentionBatch.build` cannot
express (its context is all-visible), so tree steps build their attention group directly.
"""

from __future__ import annotations

import itertools
import math
import time

import torch

from sglang_slo.engine.attention import (AttentionBatch, AttentionGroup, SequenceInput, decode_step_batch,
                                         position_slots)
from sglang_slo.engine.block_tables import BlockTables
from sglang_slo.engine.device import synchronizer
from sglang_slo.engine.kv_cache import KVCache
from sglang_slo.engine.model import LlamaForCausalLM
from sglang_slo.engine.request import Request
from sglang_slo.spec.tree import DraftTree, Frontier, HostTree, build_trees

CHAIN_STOP_PROB = 0.35
"""Greedy chains stop early (the requested depth is a maximum) after a drafted token whose
draft probability is below this: deeper tokens are then rarely accepted, while each draft step
costs ~0.4 ms on the tiny pair. Measured there (bench-engine, depth 6, CPU time): accepted
tokens per verify 3.84 -> 3.49, single-stream speedup ~1.35 -> ~1.5; 0.3-0.45 all similar.
0 = always draft the full depth."""


class Drafter:
    """Draft model + its paged cache; `build_trees()` runs all draft steps of an iteration."""

    def __init__(self, model: LlamaForCausalLM, kv: KVCache, tables: BlockTables,
                 device: str | torch.device = "cpu"):
        self.model = model
        self.kv = kv
        self.tables = tables
        self.device = torch.device(device)
        self._sync = synchronizer(self.device)  # model seconds include the GPU's work
        self.block_size = kv.block_size
        self.chain_stop_prob = CHAIN_STOP_PROB
        self._model_s = 0.0  # seconds of the last forward + LM head

    def build_trees(self, reqs: list[Request], depths: list[int], widths: list[int]
                    ) -> tuple[list[DraftTree], int, int]:
        """Candidate trees (beam search) for requests with depth >= 1; greedy chains (all
        widths 1) may end before their depth, see `CHAIN_STOP_PROB`.

        Returns (trees aligned with `reqs`, draft steps run, draft tokens fed, seconds spent
        in the draft model's forward + LM head).
        """
        if all(w == 1 for w in widths):
            return self._build_chains(reqs, depths, self.chain_stop_prob)
        stats = [0, 0, 0.0]  # steps, tokens, model seconds

        def draft_step(f: Frontier) -> torch.Tensor:
            stats[0] += 1
            if f.step == 0:
                logp, n = self._catch_up([reqs[i] for i in f.request.tolist()])
            else:
                logp, n = self._tree_step(reqs, f)
            stats[1] += n
            stats[2] += self._model_s
            # Trees are built on the host (as chains are): [F, vocab] is one small copy per
            # level, while beam bookkeeping on a GPU is ~20 tiny kernels and syncs per level.
            return logp.cpu()

        roots = torch.tensor([r.output_ids[-1] for r in reqs], dtype=torch.long)
        trees = build_trees(draft_step, roots, depths, widths)
        return trees, stats[0], stats[1], stats[2]

    @torch.inference_mode()
    def _build_chains(self, reqs: list[Request], depths: list[int], stop_prob: float = 0.0
                      ) -> tuple[list[DraftTree], int, int, float]:
        """Width-1 beam search (greedy chains) without the general tree bookkeeping: chain node
        v sits at draft position N + v - 1 = its RoPE position, so every step is a plain
        causal decode step whose metadata is sliced from one slot table built up front.
        Same trees as `build_trees(..., width=1)` with stop_prob 0; otherwise a chain ends
        early after a token whose draft probability is < stop_prob (depth 1 .. its depth)."""
        min_logprob = math.log(stop_prob) if stop_prob > 0 else -math.inf
        n = len(reqs)
        ctx0 = [r.num_tokens for r in reqs]  # committed tokens; node 1 goes to position N
        slots = position_slots([self.tables.table(r.rid, draft=True) for r in reqs],
                               max(c + d - 1 for c, d in zip(ctx0, depths)), self.block_size, self.device)
        if all(r.num_draft_computed == c - 1 for r, c in zip(reqs, ctx0)):
            # Usual case: only the root is missing from the draft cache -> a plain decode step.
            t = time.perf_counter()
            batch = decode_step_batch(slots, [c - 1 for c in ctx0])
            ids = torch.tensor([r.output_ids[-1] for r in reqs], dtype=torch.long, device=self.device)
            logits = self.model.logits(self.model.forward(ids, batch.positions, batch, self.kv))
            self._sync()
            model_s, fed = time.perf_counter() - t, n
            for r, c in zip(reqs, ctx0):
                r.num_draft_computed = c
            best, arg = _argmax_logprob(logits)                  # [n]
        else:
            logp, fed = self._catch_up(reqs)
            model_s = self._model_s
            best, arg = logp.max(dim=-1)                         # [n]
        steps = 1
        toks: list[list[int]] = [[] for _ in reqs]   # chain tokens per request
        lps: list[list[float]] = [[] for _ in reqs]  # their draft log-probs
        active = list(range(n))
        for step in range(1, max(depths) + 1):
            for i, t, lp in zip(active, arg.tolist(), best.tolist()):
                toks[i].append(t)
                lps[i].append(lp)
            keep = [j for j, i in enumerate(active) if depths[i] > step and lps[i][-1] >= min_logprob]
            if not keep:
                break
            if len(keep) < len(active):
                active = [active[j] for j in keep]
                arg = arg[torch.tensor(keep, device=arg.device)]
                slots = slots[torch.tensor(keep, device=slots.device)]
            batch = decode_step_batch(slots, [ctx0[i] + step - 1 for i in active])
            t = time.perf_counter()
            hidden = self.model.forward(arg.to(self.device), batch.positions, batch, self.kv)
            logits = self.model.logits(hidden)                   # [len(active), vocab]
            best, arg = _argmax_logprob(logits)
            self._sync()
            model_s += time.perf_counter() - t
            fed += len(active)
            steps += 1
        trees = []
        for i, r in enumerate(reqs):
            d = len(toks[i])  # <= depths[i]
            tok, dlp = [r.output_ids[-1]] + toks[i], [0.0] + lps[i]
            plp = list(itertools.accumulate(dlp))
            trees.append(DraftTree(tokens=torch.tensor(tok), parents=torch.arange(-1, d),
                                   depth=torch.arange(d + 1), draft_logprob=torch.tensor(dlp),
                                   path_logprob=torch.tensor(plp),
                                   _host=HostTree(tok, list(range(-1, d)), list(range(d + 1)), dlp, plp)))
        return trees, steps, fed, model_s

    @torch.inference_mode()
    def prefill(self, chunks: list[tuple[Request, int]]) -> float:
        """Feed prefill chunks (request, tokens from num_draft_computed) to the draft cache,
        alongside the target's prefill, so speculation never starts with a long catch-up.
        No LM head. Returns model seconds."""
        seqs, ids = [], []
        for r, n in chunks:
            start = r.num_draft_computed
            seqs.append(SequenceInput(self.tables.table(r.rid, draft=True), start, n))
            ids += r.all_ids[start: start + n]
        batch = AttentionBatch.build(seqs, self.block_size, self.device)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        t = time.perf_counter()
        self.model.forward(input_ids, batch.positions, batch, self.kv)
        self._sync()
        for r, n in chunks:
            r.num_draft_computed += n
        return time.perf_counter() - t

    # ---- forwards ----------------------------------------------------------------------

    @torch.inference_mode()
    def _catch_up(self, reqs: list[Request]) -> tuple[torch.Tensor, int]:
        """Feed every request's tokens missing from the draft cache; root log-probs [n, vocab]."""
        seqs, ids = [], []
        for r in reqs:
            pending = r.all_ids[r.num_draft_computed:]
            seqs.append(SequenceInput(self.tables.table(r.rid, draft=True), r.num_draft_computed, len(pending)))
            ids += pending
        batch = AttentionBatch.build(seqs, self.block_size, self.device)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        rows = torch.tensor(batch.last_rows, device=self.device)
        t = time.perf_counter()
        hidden = self.model.forward(input_ids, batch.positions, batch, self.kv)
        logits = self.model.logits(hidden[rows])
        self._sync()
        self._model_s = time.perf_counter() - t
        for r in reqs:
            r.num_draft_computed = r.num_tokens
        return torch.log_softmax(logits, dim=-1), len(ids)

    @torch.inference_mode()
    def _tree_step(self, reqs: list[Request], f: Frontier) -> tuple[torch.Tensor, int]:
        """Feed frontier nodes (rows grouped by request); their children's log-probs [F, vocab]."""
        bs = self.block_size
        req_idx, nodes = f.request.tolist(), f.node.tolist()
        parents = f.tree_parents.tolist()
        groups: dict[int, list[int]] = {}  # request index -> frontier rows (contiguous)
        for row, r in enumerate(req_idx):
            groups.setdefault(r, []).append(row)
        order = list(groups)
        q_max = max(len(rows) for rows in groups.values())
        ctx = [reqs[r].num_tokens for r in order]  # committed tokens in the draft cache
        n_keys = [c + max(nodes[row] for row in groups[r]) for c, r in zip(ctx, order)]
        k_max = max(n_keys)
        n_blocks = -(-k_max // bs)
        tables = torch.zeros(len(order), n_blocks, dtype=torch.long)
        for i, r in enumerate(order):
            t = self.tables.table(reqs[r].rid, draft=True)[:n_blocks]
            tables[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        kpos = torch.arange(k_max)
        k_slots = tables[:, kpos // bs] * bs + kpos % bs  # [B, K]
        mask = torch.zeros(len(order), q_max, k_max, dtype=torch.bool)  # [B, Q, K]
        slot_rows, q_index, lens = [], [], []
        for i, r in enumerate(order):
            c, rows = ctx[i], groups[r]
            mask[i, :, :c] = True
            lens.append(len(rows))
            for j, row in enumerate(rows):
                v = nodes[row]
                slot_rows.append(int(k_slots[i, c + v - 1]))
                while v > 0:  # ancestors-or-self among tree nodes (node v is key c + v - 1)
                    mask[i, j, c + v - 1] = True
                    v = parents[r][v]
                q_index.append(row)
            for j in range(len(rows), q_max):  # padded queries repeat the last real one
                mask[i, j] = mask[i, len(rows) - 1]
                q_index.append(rows[-1])
        q_index_t = torch.tensor(q_index, dtype=torch.long).view(len(order), q_max)
        valid = torch.arange(q_max)[None, :] < torch.tensor(lens)[:, None]  # [B, Q]
        out_rows = valid.reshape(-1).nonzero().squeeze(1)
        dev = self.device
        group = AttentionGroup(q_index=q_index_t.to(dev), k_slots=k_slots.to(dev), mask=mask[:, None].to(dev),
                               out_rows=out_rows.to(dev), flat_rows=q_index_t.reshape(-1)[out_rows].to(dev))
        n = len(nodes)
        ctx_of = dict(zip(order, ctx))
        positions = torch.tensor([ctx_of[r] - 1 for r in req_idx]) + f.depth.cpu()  # N - 1 + depth
        batch = AttentionBatch(
            slot_mapping=torch.tensor(slot_rows, dtype=torch.long, device=dev), positions=positions.to(dev),
            query_starts=[groups[r][0] for r in order], query_lens=lens, context_lens=ctx, groups=[group],
            identity_order=all(x == q_max for x in lens))
        input_ids = f.tokens.to(dev)
        t = time.perf_counter()
        hidden = self.model.forward(input_ids, batch.positions, batch, self.kv)
        logits = self.model.logits(hidden)
        self._sync()
        self._model_s = time.perf_counter() - t
        return torch.log_softmax(logits, dim=-1), n


def _argmax_logprob(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of the argmax, argmax) per row of [rows, vocab] logits, without a full log_softmax."""
    best, arg = logits.max(dim=-1)
    return best - torch.logsumexp(logits, dim=-1), arg
