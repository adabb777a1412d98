"""Per-request random generators for sampling (distributions and rules live in spec.verify)."""

from __future__ import annotations

import torch


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    """A request's own torch.Generator on the device its logits are on (CUDA sampling kernels
    take only a CUDA generator): seeded (reproducible on that device type; CPU and CUDA
    draw different streams) or from OS entropy."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g
