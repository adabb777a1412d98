"""Draft trees: construction by batched beam search (AdaServe) or i.i.d. sampling (SpecInfer,
chains), sub-tree extraction after selection, and the tree-attention inputs of the verify
forward (positions and ancestor masks).

Device-agnostic torch: every tensor is created on the device of the inputs.

Public API
----------
    DraftTree                      one request's tree; node 0 = root = last committed token
    Frontier                       what `draft_step` gets each step
    build_trees(draft_step, roots, depth, width) -> list[DraftTree]     beam search
    sample_trees(draft_step, roots, branching, generator=None) -> list[DraftTree]
    tree_positions(tree, context_len) -> Tensor [n]
    ancestor_mask(tree) -> Tensor [n, n] bool
    tree_attention_mask(tree, context_len) -> Tensor [n, context_len + n] bool

`draft_step(frontier) -> Tensor [F, V]` is the engine's callback: the draft model's next-token
log-probabilities for each frontier node given the committed context plus the path root -> node
(the node's own token is the input at position context_len + depth). It must return the log
of the distribution the drafter samples from (after its temperature/top-p), because sampled
trees remember it for lossless verification.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from sglang_slo.spec.select import TreeCandidates

__all__ = [
    "DraftTree",
    "HostTree",
    "Frontier",
    "DraftStep",
    "build_trees",
    "sample_trees",
    "tree_positions",
    "ancestor_mask",
    "tree_attention_mask",
]


@dataclass
class HostTree:
    """Host (Python list) copy of a tree's per-node data, for the CPU-side walks (selection,
    sub-trees, verification) without one device sync per access."""

    tokens: list[int]
    parents: list[int]
    depth: list[int]
    draft_logprob: list[float]
    path_logprob: list[float]


@dataclass
class DraftTree:
    """One request's draft tree. Nodes are numbered so that parents[v] < v.
    Treat it as immutable: `host()` caches a list copy of the tensors."""

    tokens: torch.Tensor
    """[N] long: node tokens; tokens[0] is the root, the last committed token."""
    parents: torch.Tensor
    """[N] long: parent node index; parents[0] = -1."""
    depth: torch.Tensor
    """[N] long: edges from the root (root = 0)."""
    draft_logprob: torch.Tensor
    """[N] float: log q(token_v | path to parent(v)); 0 at the root."""
    path_logprob: torch.Tensor
    """[N] float: log f(v), the sum of draft_logprob along root -> v; 0 at the root."""
    child_dist: torch.Tensor | None = None
    """[N, V] float or None: q(. | path to v) that node v's children were sampled from
    i.i.d. (sampled trees only; rows of leaves are zero). Its presence tells `verify` that
    the children of every node are i.i.d. draws, which SpecInfer's multi-step speculative
    sampling needs; `subtree` drops it unless told the selection kept that true."""
    _host: HostTree | None = field(default=None, repr=False, compare=False)

    def host(self) -> HostTree:
        """List copy of the per-node tensors (one device->host copy, then cached;
        trees from build_trees/sample_trees/subtree come with it filled in)."""
        if self._host is None:
            self._host = HostTree(self.tokens.tolist(), self.parents.tolist(), self.depth.tolist(),
                                  self.draft_logprob.tolist(), self.path_logprob.tolist())
        return self._host

    @property
    def num_nodes(self) -> int:
        return self.tokens.numel()

    @property
    def max_depth(self) -> int:
        return max(self.host().depth)

    def candidates(self, min_tokens: float = 1.0, tree_cap: int = 1 << 30) -> TreeCandidates:
        """This tree as input to `select.select_trees` (f(v) = exp(path_logprob))."""
        h = self.host()
        return TreeCandidates(path_prob=[math.exp(x) for x in h.path_logprob], parent=h.parents,
                              min_tokens=min_tokens, tree_cap=tree_cap)

    def subtree(self, nodes: Sequence[int], keep_sampling: bool = False) -> DraftTree:
        """The tree restricted to `nodes` (root first, each node after its parent), renumbered
        in that order. keep_sampling=True keeps child_dist; only correct when which nodes were
        kept did not depend on the drafted tokens (e.g. a fixed chain length), since a
        value-dependent choice (top-f selection, confidence trimming) biases the kept
        children away from q."""
        nodes = list(nodes)
        n = self.num_nodes
        if not nodes or nodes[0] != 0:
            raise ValueError("subtree nodes must start with the root (0)")
        h = self.host()
        parents = h.parents
        new_index = {}
        for i, v in enumerate(nodes):
            if not 0 <= v < n or v in new_index:
                raise ValueError(f"subtree node {v} is out of range or repeated (tree has {n} nodes)")
            if i > 0 and parents[v] not in new_index:
                raise ValueError(f"subtree node {v} comes before its parent {parents[v]}")
            new_index[v] = i
        new_parents = [-1] + [new_index[parents[v]] for v in nodes[1:]]
        dev = self.tokens.device
        idx = torch.tensor(nodes, dtype=torch.long, device=dev)
        pick = lambda xs: [xs[v] for v in nodes]  # noqa: E731
        return DraftTree(
            tokens=self.tokens[idx],
            parents=torch.tensor(new_parents, dtype=torch.long, device=dev),
            depth=self.depth[idx],
            draft_logprob=self.draft_logprob[idx],
            path_logprob=self.path_logprob[idx],
            child_dist=self.child_dist[idx] if keep_sampling and self.child_dist is not None else None,
            _host=HostTree(pick(h.tokens), new_parents, pick(h.depth), pick(h.draft_logprob),
                           pick(h.path_logprob)),
        )


@dataclass
class Frontier:
    """The nodes the draft model expands in one draft step (F of them, all requests)."""

    step: int
    """0-based draft step; step 0 expands the roots."""
    request: torch.Tensor
    """[F] long: request index (position in `roots`)."""
    node: torch.Tensor
    """[F] long: node index within that request's tree."""
    parent: torch.Tensor
    """[F] long: the node's parent index (-1 for roots): where its KV context continues."""
    tokens: torch.Tensor
    """[F] long: the node's token, the draft model's input."""
    depth: torch.Tensor
    """[F] long: the node's depth; its position is context_len + depth."""
    tree_tokens: torch.Tensor
    """[R, N_max] long: every request's nodes so far (-1 = not yet created)."""
    tree_parents: torch.Tensor
    """[R, N_max] long: their parents (-1 for roots and unused slots)."""

    def paths(self) -> list[list[int]]:
        """Tokens root -> node for each frontier node (CPU lists; for tests and toy models)."""
        toks, pars = self.tree_tokens.tolist(), self.tree_parents.tolist()
        out = []
        for r, v in zip(self.request.tolist(), self.node.tolist()):
            path = []
            while v >= 0:
                path.append(toks[r][v])
                v = pars[r][v]
            out.append(path[::-1])
        return out


DraftStep = Callable[[Frontier], torch.Tensor]


def _per_request(value: int | Sequence[int], n: int, name: str, low: int, device) -> torch.Tensor:
    vals = [value] * n if isinstance(value, int) else list(value)
    if len(vals) != n or any(int(v) < low for v in vals):
        raise ValueError(f"{name} must be an int >= {low} or one per request, got {value!r}")
    return torch.tensor(vals, dtype=torch.long, device=device)


def _call_draft(draft_step: DraftStep, frontier: Frontier) -> torch.Tensor:
    logp = draft_step(frontier)
    f = frontier.tokens.numel()
    if logp.dim() != 2 or logp.shape[0] != f:
        raise ValueError(f"draft_step must return log-probs [{f}, vocab], got {tuple(logp.shape)}")
    return logp.float()


def _split(tokens, parents, depth, dlp, plp, counts: list[int], dist=None) -> list[DraftTree]:
    """Per-request trees from padded [R, N_max] tensors, with host copies (two transfers)."""
    ints = torch.stack([tokens, parents, depth]).tolist()  # [3][R][N_max]
    floats = torch.stack([dlp, plp]).tolist()  # [2][R][N_max]
    return [
        DraftTree(tokens=tokens[r, :c], parents=parents[r, :c], depth=depth[r, :c],
                  draft_logprob=dlp[r, :c], path_logprob=plp[r, :c],
                  child_dist=None if dist is None else dist[r, :c],
                  _host=HostTree(ints[0][r][:c], ints[1][r][:c], ints[2][r][:c],
                                 floats[0][r][:c], floats[1][r][:c]))
        for r, c in enumerate(counts)
    ]


def build_trees(draft_step: DraftStep, roots: torch.Tensor,
                depth: int | Sequence[int], width: int | Sequence[int]) -> list[DraftTree]:
    """AdaServe candidate trees by batched beam search, one draft forward per level.

    roots: [R] long, each request's last committed token. depth/width: per request or shared;
    depth 0 gives a root-only tree. Step 1 expands each root to its top-w children; steps
    2..d expand each request's (up to) w frontier nodes and keep the top-w of their w*|V|
    children by path log-probability. Width 1 gives the greedy draft chain.
    Trees have at most 1 + w*d nodes, numbered level by level in descending path probability.
    """
    if roots.dim() != 1:
        raise ValueError(f"roots must be [R] token ids, got shape {tuple(roots.shape)}")
    dev = roots.device
    n_req = roots.numel()
    d_r = _per_request(depth, n_req, "depth", 0, dev)  # [R]
    w_r = _per_request(width, n_req, "width", 1, dev)  # [R]
    d_max = int(d_r.max()) if n_req else 0
    w_max = int(w_r.max()) if n_req else 1
    n_max = 1 + d_max * w_max

    tokens = torch.full((n_req, n_max), -1, dtype=torch.long, device=dev)  # [R, N_max]
    parents = torch.full_like(tokens, -1)
    depths = torch.zeros_like(tokens)
    dlp = torch.zeros((n_req, n_max), dtype=torch.float32, device=dev)
    plp = torch.zeros_like(dlp)
    tokens[:, 0] = roots.long()
    count = torch.ones(n_req, dtype=torch.long, device=dev)  # [R] nodes so far
    front = torch.full((n_req, w_max), -1, dtype=torch.long, device=dev)  # [R, W] frontier nodes
    front[:, 0] = torch.where(d_r > 0, 0, -1)

    for step in range(d_max):
        req, slot = (front >= 0).nonzero(as_tuple=True)  # [F], [F]
        if req.numel() == 0:
            break
        node = front[req, slot]
        frontier = Frontier(step=step, request=req, node=node, parent=parents[req, node],
                            tokens=tokens[req, node], depth=depths[req, node],
                            tree_tokens=tokens, tree_parents=parents)
        logp = _call_draft(draft_step, frontier)  # [F, V]
        vocab = logp.shape[1]
        # Path log-prob of every child of every frontier node, padded to [R, W, V].
        scores = torch.full((n_req, w_max, vocab), -math.inf, device=dev)
        scores[req, slot] = plp[req, node].unsqueeze(1) + logp
        k = min(w_max, w_max * vocab)
        top, flat_idx = scores.view(n_req, -1).topk(k, dim=1)  # [R, k], descending
        par_slot, child_tok = flat_idx // vocab, flat_idx % vocab
        keep = (torch.isfinite(top)
                & (torch.arange(k, device=dev).unsqueeze(0) < w_r.unsqueeze(1))
                & (step < d_r).unsqueeze(1))  # [R, k]; kept entries form a prefix per row
        par_node = front.gather(1, par_slot)  # [R, k]
        new_node = count.unsqueeze(1) + keep.long().cumsum(1) - 1  # [R, k]
        r_i, c_i = keep.nonzero(as_tuple=True)
        v_i = new_node[r_i, c_i]
        p_i = par_node[r_i, c_i]
        tokens[r_i, v_i] = child_tok[r_i, c_i]
        parents[r_i, v_i] = p_i
        depths[r_i, v_i] = step + 1
        plp[r_i, v_i] = top[r_i, c_i]
        dlp[r_i, v_i] = top[r_i, c_i] - plp[r_i, p_i]
        count += keep.long().sum(1)
        front = torch.full_like(front, -1)
        front[r_i, c_i] = v_i
    return _split(tokens, parents, depths, dlp, plp, count.tolist())


def sample_trees(draft_step: DraftStep, roots: torch.Tensor, branching: Sequence[int],
                 generator: torch.Generator | None = None) -> list[DraftTree]:
    """Trees whose children are i.i.d. samples from the draft (SpecInfer); [1] * d = a chain.

    Every node at level l gets branching[l] children drawn with replacement from
    q(. | path), the distribution `draft_step` returns; q is stored in `child_dist` so that
    `verify` can use multi-step speculative sampling (p/q acceptance). Node count is
    1 + b0 + b0*b1 + ...; all requests share the shape.
    """
    if roots.dim() != 1:
        raise ValueError(f"roots must be [R] token ids, got shape {tuple(roots.shape)}")
    if any(int(b) < 1 for b in branching):
        raise ValueError(f"branching factors must be >= 1, got {list(branching)}")
    dev = roots.device
    n_req = roots.numel()
    level_sizes = [1]
    for b in branching:
        level_sizes.append(level_sizes[-1] * int(b))
    n_nodes = sum(level_sizes)
    tokens = torch.full((n_req, n_nodes), -1, dtype=torch.long, device=dev)  # [R, N]
    parents = torch.full_like(tokens, -1)
    depths = torch.zeros_like(tokens)
    dlp = torch.zeros((n_req, n_nodes), dtype=torch.float32, device=dev)
    plp = torch.zeros_like(dlp)
    tokens[:, 0] = roots.long()
    dist: torch.Tensor | None = None  # [R, N, V] once the vocab is known

    start = 0  # first node index of the current level
    for step, b in enumerate(branching):
        size = level_sizes[step]
        level = torch.arange(start, start + size, device=dev)  # [L] node ids of this level
        req = torch.arange(n_req, device=dev).repeat_interleave(size)  # [R*L]
        node = level.repeat(n_req)  # [R*L]
        frontier = Frontier(step=step, request=req, node=node, parent=parents[req, node],
                            tokens=tokens[req, node], depth=depths[req, node],
                            tree_tokens=tokens, tree_parents=parents)
        logp = _call_draft(draft_step, frontier)  # [R*L, V]
        q = torch.softmax(logp, dim=-1)  # renormalized q
        if dist is None:
            dist = torch.zeros((n_req, n_nodes, q.shape[1]), device=dev)
        dist[req, node] = q
        draws = torch.multinomial(q, int(b), replacement=True, generator=generator)  # [R*L, b]
        child_start = start + size
        # Children of the j-th node of this level: child_start + j*b .. + b - 1.
        child = child_start + torch.arange(size * b, device=dev).view(size, b).repeat(n_req, 1)
        par = node.unsqueeze(1).expand(-1, int(b))
        rr = req.unsqueeze(1).expand(-1, int(b))
        tokens[rr, child] = draws
        parents[rr, child] = par
        depths[rr, child] = step + 1
        lq = torch.log(q.gather(1, draws))  # [R*L, b]
        dlp[rr, child] = lq
        plp[rr, child] = plp[rr, par] + lq
        start = child_start
    return _split(tokens, parents, depths, dlp, plp, [n_nodes] * n_req, dist)


# ----------------------------------------------------------------------------------------
# Tree attention inputs for the target's verify forward
# ----------------------------------------------------------------------------------------


def tree_positions(tree: DraftTree, context_len: int) -> torch.Tensor:
    """[n] long positions of the tree tokens: context_len + depth. context_len = tokens in the
    KV cache before the root, so the root sits at position context_len."""
    return tree.depth + context_len


def ancestor_mask(tree: DraftTree) -> torch.Tensor:
    """[n, n] bool: mask[i, j] is True iff node j is node i or one of its ancestors
    (the tree-attention mask among the tree's own tokens). Built on the host from the
    parent list (row v = row parent(v) plus v) and copied to the tree's device once, which
    beats depth-many small kernels for trees of tens of nodes."""
    parents = tree.host().parents
    n = len(parents)
    rows: list[list[bool]] = []
    for v, p in enumerate(parents):
        row = list(rows[p]) if p >= 0 else [False] * n
        row[v] = True
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool, device=tree.parents.device)


def tree_attention_mask(tree: DraftTree, context_len: int) -> torch.Tensor:
    """[n, context_len + n] bool: every tree token sees the whole committed context plus its
    ancestors and itself (True = attend)."""
    n = tree.num_nodes
    ctx = torch.ones((n, context_len), dtype=torch.bool, device=tree.tokens.device)
    return torch.cat([ctx, ancestor_mask(tree)], dim=1)
