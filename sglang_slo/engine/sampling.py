"""Per-request random generators for sampling (distributions and rules live in spec.verify)."""

from __future__ import annotations

import torch


def make_generator(seed: int | None) -> torch.Generator:
    """A request's own torch.Generator: seeded (reproducible) or from OS entropy."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g
