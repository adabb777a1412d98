"""A second-order "language model" defined by a fixed random table: logits of the next token
given the last two tokens. Draft/target pairs of them exercise speculation exactly (tests,
benchmarks) without training: the draft is the target's table plus noise.

    TableLM(vocab, seed, scale=3.0)            target
    lm.perturbed(noise, seed) -> TableLM       a correlated draft
    lm.next_logits(prev, last) -> [F, V]
    lm.draft_step(prompts) -> DraftStep        callback for tree.build_trees / sample_trees
    lm.tree_logits(tree, prompt) -> [n, V]     what the target's verify forward would return
    lm.greedy_generate(prompt, n) -> list[int]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from sglang_slo.spec.tree import DraftStep, DraftTree, Frontier

__all__ = ["TableLM"]


@dataclass
class TableLM:
    """Next-token logits table[prev, last] of shape [V, V, V]."""

    table: torch.Tensor
    """[V, V, V] float logits indexed by (second-to-last token, last token)."""

    @classmethod
    def random(cls, vocab: int, seed: int, scale: float = 3.0, device: str | torch.device = "cpu") -> TableLM:
        g = torch.Generator().manual_seed(seed)
        return cls((torch.randn((vocab, vocab, vocab), generator=g) * scale).to(device))

    @property
    def vocab(self) -> int:
        return self.table.shape[-1]

    def perturbed(self, noise: float, seed: int) -> TableLM:
        """A draft model: this table plus Gaussian noise of std `noise` (logits)."""
        g = torch.Generator().manual_seed(seed)
        eps = torch.randn(self.table.shape, generator=g).to(self.table.device)
        return TableLM(self.table + noise * eps)

    def next_logits(self, prev: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """[F] second-to-last and [F] last tokens -> [F, V] logits."""
        return self.table[prev, last]

    def draft_step(self, prompts: Sequence[Sequence[int]], temperature: float = 1.0) -> DraftStep:
        """Callback for build_trees/sample_trees: request r's context is prompts[r] (>= 2
        tokens, its last token is the root) followed by the path to the frontier node."""
        if any(len(p) < 2 for p in prompts):
            raise ValueError("TableLM prompts need at least 2 tokens")
        before_root = torch.tensor([p[-2] for p in prompts], device=self.table.device)  # [R]

        def step(f: Frontier) -> torch.Tensor:
            par_tok = f.tree_tokens[f.request, f.parent.clamp(min=0)]
            prev = torch.where(f.parent >= 0, par_tok, before_root[f.request])
            return torch.log_softmax(self.next_logits(prev, f.tokens) / temperature, dim=-1)

        return step

    def tree_logits(self, tree: DraftTree, prompt: Sequence[int]) -> torch.Tensor:
        """[n, V]: logits after each tree node (the verify forward's output rows)."""
        par_tok = tree.tokens[tree.parents.clamp(min=0)]
        prev = torch.where(tree.parents >= 0, par_tok, torch.full_like(par_tok, prompt[-2]))
        return self.next_logits(prev, tree.tokens)

    def greedy_generate(self, prompt: Sequence[int], n: int) -> list[int]:
        """Plain (non-speculative) greedy decoding of n tokens."""
        seq = list(prompt)
        for _ in range(n):
            seq.append(int(self.table[seq[-2], seq[-1]].argmax()))
        return seq[len(prompt):]
