"""Tree verification: which draft tokens the target accepts, and the bonus/correction token.

Input: a (selected) DraftTree and the target's logits at every tree node, from one verify
forward with the tree-attention mask: row v = the target's next-token logits given the
committed context plus the path root -> v.

Rules, all lossless (the committed tokens have exactly the target's distribution, after
temperature and top-p; greedy output equals plain greedy decoding token for token):

  temperature == 0      greedy_verify: from the root, follow the child whose token is the
                        target argmax at the current node; commit that path plus the argmax
                        at the last accepted node (the bonus/correction token).
  any tree (default     sampling_verify: at the current node draw x ~ p(.|node) from the
  for temperature > 0)  target; if a child has token x move there, else stop and commit x.
                        Every committed token is a draw from p given the committed prefix,
                        whatever the tree is and however it was selected, so this is the rule
                        for beam-search trees and for any tree after value-dependent
                        selection (AdaServe top-f, SpecServe confidence trimming).
  sampled tree/chain    speculative_sampling_verify (SpecInfer multi-step speculative
  (child_dist kept)     sampling; for a chain the standard rule): at node u with children
                        c_1..c_k drawn i.i.d. from q = child_dist[u], for each child in turn
                        accept x = token(c) with probability min(1, p(x)/q(x)), else set
                        p <- norm(max(p - q, 0)) and try the next; if none is accepted, commit
                        a draw from the final p. Needs the children to be i.i.d. draws from q,
                        which `DraftTree.subtree` guarantees by dropping child_dist unless told
                        the selection did not look at the drafted tokens.
`verify` picks among these; notation: p = target prob, q = draft prob.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from sglang_slo.spec.tree import DraftTree

__all__ = [
    "VerifyResult",
    "logits_to_probs",
    "sample_rows",
    "greedy_verify",
    "greedy_verify_batch",
    "sampling_verify",
    "speculative_sampling_verify",
    "verify",
    "verify_batch",
]


@dataclass
class VerifyResult:
    """Outcome of verifying one request's tree; the stats map onto protos.RequestProgress."""

    nodes: list[int] = field(default_factory=list)
    """Accepted draft nodes, root -> deepest, root excluded (the root is already committed)."""
    tokens: list[int] = field(default_factory=list)
    """Committed tokens: the accepted nodes' tokens, then one bonus/correction token."""
    verified: int = 0
    """Draft nodes in the verified tree (root excluded)."""
    depth: int = 0
    """Depth of the verified tree (its longest draft path)."""
    draft_conf: float = 0.0
    """Mean draft probability q(token | path) over the accepted nodes (0 when none)."""

    @property
    def accepted(self) -> int:
        """Draft tokens accepted (excluding the bonus/correction token)."""
        return len(self.nodes)


def logits_to_probs(logits: torch.Tensor, temperature: float | Sequence[float] = 1.0,
                    top_p: float | Sequence[float] = 1.0) -> torch.Tensor:
    """[n, V] logits -> [n, V] probabilities at `temperature`, restricted to the smallest set of
    most likely tokens whose mass reaches `top_p` (nucleus), renormalized. temperature and
    top_p are scalars or one value per row."""
    n = logits.shape[0]
    temps = [float(temperature)] * n if isinstance(temperature, (int, float)) else [float(t) for t in temperature]
    tps = [float(top_p)] * n if isinstance(top_p, (int, float)) else [float(t) for t in top_p]
    if len(temps) != n or len(tps) != n:
        raise ValueError(f"temperature and top_p need a scalar or {n} values (one per row)")
    if not all(t > 0 for t in temps):
        raise ValueError(f"temperature must be > 0 for sampling (0 = greedy), got {temperature}")
    if not all(0 < t <= 1 for t in tps):
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    dev = logits.device
    if len(set(temps)) <= 1:
        scaled = logits.float() / (temps[0] if temps else 1.0)
    else:
        scaled = logits.float() / torch.tensor(temps, device=dev).unsqueeze(1)
    probs = torch.softmax(scaled, dim=-1)
    if any(t < 1 for t in tps):
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the more likely tokens
        limit = torch.tensor(tps, device=dev).unsqueeze(1)  # [n, 1]
        sorted_p = sorted_p.masked_fill(before >= limit, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_rows(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """[n, V] probabilities -> [n] long, one exact draw per row without a device sync
    (gpt-fast's multinomial_sample_one_no_sync: argmax of p / Exp(1) noise, the exponential
    form of the Gumbel-max trick; zero-probability tokens are never drawn)."""
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(dim=-1)


def _children(tree: DraftTree) -> tuple[list[list[int]], list[int]]:
    h = tree.host()
    children: list[list[int]] = [[] for _ in h.parents]
    for v in range(1, len(h.parents)):
        children[h.parents[v]].append(v)
    return children, h.tokens


def _result(tree: DraftTree, nodes: list[int], tokens: list[int], bonus: int) -> VerifyResult:
    h = tree.host()
    conf = sum(math.exp(h.draft_logprob[v]) for v in nodes) / len(nodes) if nodes else 0.0
    return VerifyResult(nodes=nodes, tokens=[tokens[v] for v in nodes] + [bonus],
                        verified=len(h.tokens) - 1, depth=max(h.depth), draft_conf=conf)


def _check_rows(tree: DraftTree, rows: torch.Tensor, what: str) -> None:
    if rows.dim() != 2 or rows.shape[0] != tree.num_nodes:
        raise ValueError(f"{what} must be [{tree.num_nodes}, vocab] (one row per tree node), "
                         f"got {tuple(rows.shape)}")


def _walk_argmax(tree: DraftTree, argmax: list[int]) -> VerifyResult:
    children, tokens = _children(tree)
    node, path = 0, []
    while True:
        nxt = next((c for c in children[node] if tokens[c] == argmax[node]), None)
        if nxt is None:
            return _result(tree, path, tokens, argmax[node])
        path.append(nxt)
        node = nxt


def greedy_verify(tree: DraftTree, target_logits: torch.Tensor) -> VerifyResult:
    """Greedy tree verification. target_logits: [n, V], row v = logits after node v."""
    _check_rows(tree, target_logits, "target_logits")
    return _walk_argmax(tree, target_logits.argmax(-1).tolist())


def greedy_verify_batch(trees: Sequence[DraftTree], target_logits: torch.Tensor) -> list[VerifyResult]:
    """Greedy verification of several trees whose logits are packed in order: [sum n, V].
    One argmax and one device->host copy for the whole batch."""
    sizes = [t.num_nodes for t in trees]
    if target_logits.dim() != 2 or target_logits.shape[0] != sum(sizes):
        raise ValueError(f"target_logits must be [{sum(sizes)}, vocab], got {tuple(target_logits.shape)}")
    argmax = target_logits.argmax(-1).tolist()
    out, start = [], 0
    for tree, n in zip(trees, sizes):
        out.append(_walk_argmax(tree, argmax[start:start + n]))
        start += n
    return out


def sampling_verify(tree: DraftTree, target_probs: torch.Tensor,
                    generator: torch.Generator | None = None) -> VerifyResult:
    """Lossless verification of any tree: walk while the target's own draw matches a child.
    target_probs: [n, V] (after temperature / top-p), row v = p(. | path to v)."""
    _check_rows(tree, target_probs, "target_probs")
    # One independent draw per node; the walk uses each at most once.
    draws = sample_rows(target_probs, generator).tolist()  # [n]
    return _walk_argmax(tree, draws)


def speculative_sampling_verify(tree: DraftTree, target_probs: torch.Tensor,
                                generator: torch.Generator | None = None) -> VerifyResult:
    """SpecInfer multi-step speculative sampling (the p/q rule; chains are the k = 1 case).
    Requires tree.child_dist (children i.i.d. from q). target_probs: [n, V]."""
    _check_rows(tree, target_probs, "target_probs")
    if tree.child_dist is None:
        raise ValueError("speculative_sampling_verify needs a sampled tree (child_dist); "
                         "use sampling_verify for beam-search or value-selected trees")
    children, tokens = _children(tree)
    dev = target_probs.device
    node, path = 0, []
    while True:
        p = target_probs[node]  # [V] target
        q = tree.child_dist[node]  # [V] draft the children were drawn from
        accepted = None
        for c in children[node]:
            x = tokens[c]
            # q(x) > 0 since x was drawn from q; p(x) >= q(x): always accept;
            # p(x) < q(x): accept with probability p(x)/q(x).
            u = torch.rand((), generator=generator, device=dev)
            if bool(u * q[x] < p[x]):
                accepted = c
                break
            residual = torch.clamp(p - q, min=0.0)
            mass = residual.sum()
            if bool(mass > 0):  # mass 0 only when p == q up to rounding
                p = residual / mass
        if accepted is None:
            bonus = int(sample_rows(p.unsqueeze(0), generator)[0])
            return _result(tree, path, tokens, bonus)
        path.append(accepted)
        node = accepted


def verify(tree: DraftTree, target_logits: torch.Tensor, temperature: float = 0.0,
           top_p: float = 1.0, generator: torch.Generator | None = None) -> VerifyResult:
    """Verify one tree with the rule that fits it (module docstring): greedy when
    temperature == 0, multi-step speculative sampling when the tree still carries its i.i.d.
    sampling distributions (child_dist), else the target-draw matching rule."""
    _check_rows(tree, target_logits, "target_logits")
    if temperature == 0:
        return greedy_verify(tree, target_logits)
    probs = logits_to_probs(target_logits, temperature, top_p)
    if tree.child_dist is not None:
        return speculative_sampling_verify(tree, probs, generator)
    return sampling_verify(tree, probs, generator)


def verify_batch(trees: Sequence[DraftTree], target_logits: torch.Tensor,
                 temperature: Sequence[float], top_p: Sequence[float],
                 generator: torch.Generator | None = None) -> list[VerifyResult]:
    """`verify` for each tree of a batch whose logits are packed in order: [sum n, V].
    Batched: one argmax for the greedy trees, one softmax + one draw per node (sample_rows) for
    the trees verified by target-draw matching, then host-side walks; sampled trees that
    keep child_dist go through speculative_sampling_verify one by one."""
    sizes = [t.num_nodes for t in trees]
    if target_logits.dim() != 2 or target_logits.shape[0] != sum(sizes):
        raise ValueError(f"target_logits must be [{sum(sizes)}, vocab], got {tuple(target_logits.shape)}")
    if not len(temperature) == len(top_p) == len(trees):
        raise ValueError("temperature and top_p need one entry per tree")
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + n)
    greedy = [i for i, t in enumerate(temperature) if t == 0]
    match = [i for i, t in enumerate(trees) if temperature[i] != 0 and t.child_dist is None]
    argmax = target_logits.argmax(-1).tolist() if greedy else []
    draws: dict[int, list[int]] = {}
    if match:
        rows = [r for i in match for r in range(starts[i], starts[i + 1])]
        probs = logits_to_probs(target_logits[torch.tensor(rows, device=target_logits.device)],
                                [temperature[i] for i in match for _ in range(sizes[i])],
                                [top_p[i] for i in match for _ in range(sizes[i])])
        flat = sample_rows(probs, generator).tolist()  # [rows]
        o = 0
        for i in match:
            draws[i] = flat[o:o + sizes[i]]
            o += sizes[i]
    out = []
    for i, tree in enumerate(trees):
        a, b = starts[i], starts[i + 1]
        if temperature[i] == 0:
            out.append(_walk_argmax(tree, argmax[a:b]))
        elif i in draws:
            out.append(_walk_argmax(tree, draws[i]))
        else:
            out.append(verify(tree, target_logits[a:b], temperature[i], top_p[i], generator))
    return out
