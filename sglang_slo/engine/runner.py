"""Executes one scheduled batch: draft trees -> selection -> one ragged target forward ->
verification -> KV commit/rollback in both caches.

The target forward carries, in one ragged batch, every prefill chunk (causal), every plain
decode (the root alone) and every verify tree (root + selected nodes, tree mask). Tree
tokens are written to the request's next target positions in selection order; after
verification the accepted path's K/V is moved to contiguous positions and blocks past the
committed length are freed (rollback of the rest).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from sglang_slo.engine.attention import AttentionBatch, SequenceInput, decode_batch, position_slots
from sglang_slo.engine.block_tables import BlockTables
from sglang_slo.engine.decode_kv import DecodeKV
from sglang_slo.engine.device import attention_backends, synchronizer
from sglang_slo.engine.drafter import Drafter
from sglang_slo.engine.kv_cache import KVCache
from sglang_slo.engine.model import LlamaForCausalLM
from sglang_slo.engine.request import Request, RequestStatus
from sglang_slo.engine.sampling import make_generator
from sglang_slo.engine.scheduler import DecodeWork, ScheduledBatch
from sglang_slo.spec.select import TreeCandidates, select_trees
from sglang_slo.spec.tree import DraftTree, ancestor_mask
from sglang_slo.spec.verify import logits_to_probs, verify


@dataclass
class RequestResult:
    """What one request got from one iteration."""

    new_tokens: list[int] = field(default_factory=list)
    prefill_tokens: int = 0
    verified: int = 0
    """Draft tokens verified (selected tree nodes, root excluded)."""
    accepted: int = 0
    depth: int = 0
    """Depth of the verified tree."""
    draft_conf: float = 0.0
    """Mean draft probability q(token | path) along the verified tree's most likely deepest
    path (accepted or not, so it is informative when nothing was accepted)."""
    error: str = ""


@dataclass
class RunOutput:
    results: dict[str, RequestResult] = field(default_factory=dict)
    """By request id."""
    forward_s: float = 0.0
    """Whole `run()` time: drafting, selection, metadata, forwards, verification, seconds."""
    model_s: float = 0.0
    """Time inside the draft and target models' forward + LM head calls, seconds."""
    draft_s: float = 0.0
    draft_steps: int = 0
    draft_tokens: int = 0
    verify_tokens: int = 0
    """Decode + tree tokens in the target forward (roots included)."""
    prefill_tokens: int = 0
    context_tokens: int = 0
    """Sum over sequences of keys attended (cached context + new tokens)."""


@dataclass
class _Verify:
    """One decoding request's share of the target forward."""

    work: DecodeWork
    tokens: list[int]
    """Tokens fed: root, then the selected tree nodes."""
    tree: DraftTree | None = None
    """Selected subtree (None = the root alone)."""
    nodes: list[int] = field(default_factory=list)
    """Candidate-tree index of each selected node (for the draft cache commit)."""
    draft_depth: int = 0
    """Depth of the candidate tree: nodes shallower than this were fed to the draft model
    (its deepest level never is); below the work's depth when a chain stopped early."""


DENSE_IDLE_RUNS = 256
"""Requests finishing their prefill get dense decode rows at once (`_admit_decoders`) while
plain decode ran within this many forwards; a runner that only speculates keeps none."""


class ModelRunner:
    """Target model and cache (+ optional drafter); `run(batch)` executes one iteration."""

    def __init__(self, model: LlamaForCausalLM, kv: KVCache, tables: BlockTables,
                 drafter: Drafter | None = None, device: str | torch.device = "cpu",
                 slo_order: str = "fewest_tokens"):
        self.model = model
        self.kv = kv
        self.tables = tables
        self.drafter = drafter
        self.device = torch.device(device)
        self._sync = synchronizer(self.device)  # model seconds include the GPU's work
        self._attention = attention_backends(self.device)
        self.slo_order = slo_order
        self.decode_kv = DecodeKV(kv)
        self._dense_reqs: list[Request] = []  # held rows' requests: keeps their ids unique
        self._runs_since_plain = 1 << 30      # forwards since the last plain decode

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> RunOutput:
        with self._attention():
            return self._run(batch)

    def _run(self, batch: ScheduledBatch) -> RunOutput:
        out = RunOutput()
        t0 = time.perf_counter()
        if self.drafter is not None and batch.prefills:
            # The draft prefills the same chunks (its cache stays in step with the target's).
            chunks = [(p.req, p.num_tokens) for p in batch.prefills if p.req.num_draft_computed == p.req.num_computed]
            if chunks:
                out.model_s += self.drafter.prefill(chunks)
        verifies = self._draft_and_select(batch, out)
        out.draft_s = time.perf_counter() - t0

        # ---- one ragged target forward: prefill chunks, then decodes / verify trees ----
        self._runs_since_plain += 1
        if not batch.prefills and verifies and all(v.tree is None for v in verifies):
            attn, ids, rows = self._plain_decode(verifies, out)
            self._runs_since_plain = 0
        else:  # the dense decode copy stays: keys below committed lengths do not change
            attn, ids, rows = self._ragged(batch, verifies, out)
            if attn is None:
                return out
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        t_model = time.perf_counter()
        try:
            hidden = self.model.forward(input_ids, attn.positions, attn, self.kv)
        except BaseException:
            self.decode_kv.reset()
            raise
        if rows is not None:  # only the rows that need logits
            hidden = hidden[torch.tensor(rows, dtype=torch.long, device=self.device)]
        logits = self.model.logits(hidden)  # [R, vocab] float32
        self._sync()
        out.model_s += time.perf_counter() - t_model
        finite, argmax = _finite_and_argmax(logits)  # [R] each

        # ---- verification and commit -----------------------------------------------
        o = 0
        for p in batch.prefills:
            r = p.req
            res = out.results.setdefault(r.rid, RequestResult())
            res.prefill_tokens = p.num_tokens
            r.num_computed += p.num_tokens
            if not r.is_prefilling and not r.output_ids:
                if not finite[o]:
                    res.error = "non-finite logits (NaN/inf) in prefill"
                elif r.params.greedy:
                    res.new_tokens = [argmax[o]]
                else:
                    res.new_tokens = [self._sample(r, logits[o])]
                o += 1
        moves, draft_moves = ([], []), ([], [])
        for v in verifies:
            r, n = v.work.req, len(v.tokens)
            res = out.results.setdefault(r.rid, RequestResult())
            if not all(finite[o: o + n]):
                res.error = "non-finite logits (NaN/inf) in decode"
                o += n
                continue
            if v.tree is None:  # plain decode: no tree machinery
                res.new_tokens = [argmax[o] if r.params.greedy else self._sample(r, logits[o])]
                path = []
            else:
                vr = self._verify(r, v.tree, logits[o: o + n], argmax[o: o + n])
                res.new_tokens, path = vr.tokens, vr.nodes
                res.verified, res.accepted, res.depth = vr.verified, vr.accepted, vr.depth
                res.draft_conf = _path_confidence(v.tree)
                r.num_verifies += 1
                r.num_accepted += vr.accepted
            o += n
            self._commit(v, path, moves, draft_moves)
        if batch.prefills and self._runs_since_plain <= DENSE_IDLE_RUNS:
            self._admit_decoders(batch, out)
        if moves[0]:
            self.kv.move_slots(*moves)
        if draft_moves[0]:
            self.drafter.kv.move_slots(*draft_moves)
        for v in verifies:  # rollback: free blocks past what is committed
            r = v.work.req
            self.tables.shrink(r.rid, r.num_computed, r.num_draft_computed)
        out.forward_s = time.perf_counter() - t0
        return out

    # ---- pieces ------------------------------------------------------------------------

    def _admit_decoders(self, batch: ScheduledBatch, out: RunOutput) -> None:
        """Rows in the dense decode copy for requests whose prefill completed in this forward
        (they decode next): the copy is paid here, ~1 us per prompt token on the tiny pair,
        not by their first decode step (where it was ~20-30% of the step)."""
        done = []
        for p in batch.prefills:
            r, res = p.req, out.results.get(p.req.rid)
            if not r.is_prefilling and (r.output_ids or (res and res.new_tokens)) and not (res and res.error):
                done.append(r)
        if done:
            tables = [self.tables.table(r.rid) for r in done]
            # Rows of finished or preempted requests are taken first (their objects stay
            # referenced until the next plain decode replaces the held set: ids stay unique).
            alive = {dense_key(r) for r in self._dense_reqs if r.status is RequestStatus.RUNNING}
            self.decode_kv.admit([dense_key(r) for r in done], [r.num_computed for r in done],
                                 lambda n: position_slots(tables, n, self.kv.block_size, self.device),
                                 alive=alive)
            self._dense_reqs = self._dense_reqs + done

    def _plain_decode(self, verifies: list[_Verify], out: RunOutput):
        """Inputs of a forward of roots only: tensor-built metadata over the dense decode
        copy (no per-layer gathers; rows of requests that joined, or that committed tokens in
        other forwards since, are brought up to date). The batch runs in the copy's row
        order; rows (None = all, in order) put the logits back in `verifies` order."""
        reqs = [v.work.req for v in verifies]
        # A row's key is one request lifetime: a preempted request is recomputed, and a
        # request id may come back as another request (its object stays referenced while
        # held, so id() cannot be reused meanwhile).
        keys = tuple(map(dense_key, reqs))
        order, rows = self.decode_kv.order_of(keys), None
        if order is not None:
            reqs, keys = [reqs[i] for i in order], tuple(keys[i] for i in order)
            rows = [0] * len(order)
            for pos, i in enumerate(order):
                rows[i] = pos
        self._dense_reqs = reqs
        ctx = [r.num_computed for r in reqs]
        attn = decode_batch([self.tables.table(r.rid) for r in reqs], ctx, self.kv.block_size,
                            self.decode_kv, keys, self.device)
        out.verify_tokens += len(reqs)
        out.context_tokens += sum(ctx) + len(reqs)
        return attn, [r.output_ids[-1] for r in reqs], rows

    def _ragged(self, batch: ScheduledBatch, verifies: list[_Verify], out: RunOutput):
        """Inputs of a general forward: prefill chunks, then decodes / verify trees.
        Returns (batch metadata or None if empty, input ids, rows whose logits are needed)."""
        seqs, ids, rows = [], [], []
        for p in batch.prefills:
            r = p.req
            seqs.append(SequenceInput(self.tables.table(r.rid), r.num_computed, p.num_tokens))
            ids += r.all_ids[r.num_computed: r.num_computed + p.num_tokens]
            if r.num_computed + p.num_tokens >= r.prefill_target and not r.output_ids:
                rows.append(len(ids) - 1)  # prefill completes: sample the first token
            out.prefill_tokens += p.num_tokens
            out.context_tokens += r.num_computed + p.num_tokens
        for v in verifies:
            r, n = v.work.req, len(v.tokens)
            # A chain's ancestor mask is the causal one: let the batch builder use its causal path.
            chain = v.tree is None or v.tree.host().parents == list(range(-1, n - 1))
            mask = None if chain else ancestor_mask(v.tree)
            seqs.append(SequenceInput(self.tables.table(r.rid), r.num_computed, n, tree_mask=mask))
            rows += range(len(ids), len(ids) + n)
            ids += v.tokens
            out.verify_tokens += n
            out.context_tokens += r.num_computed + n
        if not seqs:
            return None, ids, rows
        return AttentionBatch.build(seqs, self.kv.block_size, self.device), ids, rows

    def _draft_and_select(self, batch: ScheduledBatch, out: RunOutput) -> list[_Verify]:
        """Beam-search trees for speculating requests, then AdaServe selection under B."""
        decodes = batch.decodes
        spec = [i for i, w in enumerate(decodes) if w.depth > 0] if self.drafter is not None else []
        if not spec:
            return [_Verify(w, [w.req.output_ids[-1]]) for w in decodes]
        trees, out.draft_steps, out.draft_tokens, model_s = self.drafter.build_trees(
            [decodes[i].req for i in spec], [decodes[i].depth for i in spec], [decodes[i].width for i in spec])
        out.model_s += model_s
        by_index = dict(zip(spec, trees))
        cands = []
        for i, w in enumerate(decodes):
            t = by_index.get(i)
            if t is None:
                cands.append(_root_candidates(w))
            else:
                cands.append(t.candidates(min_tokens=w.min_tokens, tree_cap=w.tree_cap))
        sel = select_trees(cands, budget=batch.verify_budget, slo_order=self.slo_order)
        verifies = []
        for i, (w, nodes) in enumerate(zip(decodes, sel.nodes)):
            t = by_index.get(i)
            if t is None:
                verifies.append(_Verify(w, [w.req.output_ids[-1]]))
                continue
            sub = t.subtree(nodes)
            verifies.append(_Verify(w, sub.tokens.tolist(), sub, nodes, max(t.host().depth)))
        return verifies

    def _verify(self, r: Request, tree: DraftTree, logits: torch.Tensor, argmax: list[int]):
        if r.params.greedy:
            return verify(tree, logits)
        if r.generator is None:
            r.generator = make_generator(r.params.seed, self.device)
        return verify(tree, logits, r.params.temperature, r.params.top_p, r.generator)

    def _sample(self, r: Request, logits: torch.Tensor) -> int:
        if r.generator is None:
            r.generator = make_generator(r.params.seed, self.device)
        probs = logits_to_probs(logits[None], r.params.temperature, r.params.top_p)[0]
        return int(torch.multinomial(probs, 1, generator=r.generator))

    def _commit(self, v: _Verify, path: list[int], moves, draft_moves) -> None:
        """Keep the accepted path's K/V (moved to contiguous positions) in both caches."""
        r, ctx = v.work.req, v.work.req.num_computed
        # Target: selected node k sits at position ctx + k; accepted i-th -> ctx + i.
        pairs = [(ctx + k, ctx + i) for i, k in enumerate(path, start=1) if k != i]
        if pairs:
            moves[0].extend(self.tables.slots(r.rid, [a for a, _ in pairs]))
            moves[1].extend(self.tables.slots(r.rid, [b for _, b in pairs]))
        r.num_computed = ctx + 1 + len(path)
        if v.tree is not None and v.work.depth:
            # Draft: candidate node c (level l < draft depth, so it was fed) sits at N + c - 1,
            # the l-th accepted token belongs at N + l - 1 (N = committed tokens, root included).
            n_tok = ctx + 1
            fed = [v.nodes[k] for k in path if int(v.tree.depth[k]) < v.draft_depth]
            pairs = [(n_tok + c - 1, n_tok + l) for l, c in enumerate(fed) if c - 1 != l]
            if pairs:
                draft_moves[0].extend(self.tables.slots(r.rid, [a for a, _ in pairs], draft=True))
                draft_moves[1].extend(self.tables.slots(r.rid, [b for _, b in pairs], draft=True))
            r.num_draft_computed = n_tok + len(fed)


def dense_key(r: Request) -> tuple:
    """Key of a request's row in the dense decode copy: one lifetime of its KV (a preempted
    request is recomputed; an id may come back as another request object)."""
    return (r.rid, id(r), r.num_preemptions)


def _finite_and_argmax(logits: torch.Tensor) -> tuple[list[bool], list[int]]:
    """Per row of `[R, vocab]`: all finite, and the greedy token (first maximum, as argmax).

    A row with a NaN/inf entry has a non-finite sum, so the exact (4 passes, ~0.4 ms at
    32 x 4096) test runs only on batches whose sums say so (or, in theory, overflowed)."""
    arg = logits.max(-1).indices  # ~3x faster than argmax on CPU; same index, NaN included
    finite = torch.isfinite(logits.sum(-1))
    if not bool(finite.all()):
        finite = torch.isfinite(logits).all(-1)
    return finite.tolist(), arg.tolist()


def _root_candidates(w: DecodeWork) -> TreeCandidates:
    return TreeCandidates(path_prob=[1.0], parent=[-1], min_tokens=1.0, tree_cap=1)


def _path_confidence(tree: DraftTree) -> float:
    """Mean draft probability along the deepest, then most likely, root-to-leaf path."""
    if tree.num_nodes <= 1:
        return 0.0
    depth, plp = tree.depth.tolist(), tree.path_logprob.tolist()
    parents, dlp = tree.parents.tolist(), tree.draft_logprob.exp().tolist()
    v = max(range(1, len(depth)), key=lambda n: (depth[n], plp[n]))
    probs = []
    while v > 0:
        probs.append(dlp[v])
        v = parents[v]
    return sum(probs) / len(probs)
