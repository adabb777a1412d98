"""`fcfs_mixed`: `fcfs` with SGLang's `--enable-mixed-chunk` (not SGLang's default).

The prefill chunk shares each iteration with the running batch, whose rows do not speculate
in that iteration; iterations without prefill decode with the fixed k. Kept beside `fcfs`
so capacity tables can show both SGLang modes side by side.
"""

from __future__ import annotations


from sidecar.policies.base import build_config
from sidecar.policies.fcfs import FcfsConfig, FcfsPolicy


class FcfsMixedPolicy(FcfsPolicy):
    name = "fcfs_mixed"


def make(**overrides) -> FcfsMixedPolicy:
    """fcfs options; `mixed_chunk` defaults to True here."""
    cfg = build_config(FcfsConfig, {"mixed_chunk": True, **overrides}, "fcfs_mixed")
    return FcfsMixedPolicy(cfg)
