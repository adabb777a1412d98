"""CPU bridge: a pure-PyTorch stand-in for the two `sgl_kernel` CPU ops SGLang 0.5.23 imports.

Test support, not product. With `--device cpu` and `SGLANG_USE_CPU_ENGINE=1`, SGLang imports
`assign_req_to_token_pool_cpu` (mem_cache/allocation.py) and `copy_all_layer_kv_cache_cpu`
(spec-decode KV pools; it raises here) from `sgl_kernel`, whose CPU build is not on the package registry.
Any other name imports as a function that raises when called, so an unexpected kernel
dependency fails loudly instead of silently. Having no `convert_weight_packed`, SGLang detects no AMX and runs
every layer's `forward_native` torch path. Put `tests/sglang_support/sgl_kernel_shim` on
PYTHONPATH of the SGLang server processes only.
"""

from __future__ import annotations

import torch

__version__ = "0.0.0+sglang-slo-cpu-shim"


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,  # [bs] row of each request in req_to_token
    req_to_token: torch.Tensor,  # [max_reqs, pool_len] token slot table
    start_offset: torch.Tensor,  # [bs] first position written
    end_offset: torch.Tensor,  # [bs] one past the last position written
    out_cache_loc: torch.Tensor,  # [sum(end - start)] KV slots, requests back to back
    pool_len: int,
) -> None:
    """req_to_token[row_i, start_i:end_i] = the i-th run of out_cache_loc, for every i."""
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    rows = req_pool_indices.tolist()
    pos = 0
    for row, start, end in zip(rows, starts, ends):
        n = end - start
        if n > 0:
            req_to_token[row, start:end] = out_cache_loc[pos : pos + n].to(req_to_token.dtype)
        pos += n


def copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt_loc, src_loc) -> None:
    """Spec-decode KV moves work on raw data pointers; speculation does not run on CPU here."""
    raise NotImplementedError(
        "copy_all_layer_kv_cache_cpu needs sgl-kernel's CPU build (speculative decoding on CPU); "
        "the sglang-slo CPU shim serves non-speculative decoding only"
    )


def __getattr__(name: str):
    """Any other op imports (SGLang imports many at module level) but raises when called."""
    if name.startswith("__"):
        raise AttributeError(name)

    def missing_op(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} is not available: this is sglang-slo's CPU test shim "
            "(tests/sglang_support/sgl_kernel_shim), which implements only assign_req_to_token_pool_cpu"
        )

    missing_op.__name__ = name
    return missing_op
