"""Why bfloat16 speculative iterations were slow on the H200: SDPA calls of the engine's
shapes (6 query heads, 2 KV heads, head_dim 32, boolean mask [B, 1, Q, K]) at a new key
length every call, timed per backend set. A backend that builds a plan per shape (cuDNN) pays
that on every new K; the engine's iterations all have new K. Prints JSON.

    python scripts/sdpa_check.py
"""

from __future__ import annotations

import contextlib
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def timed(backends, dtype, b: int, q: int, keys: list[int]) -> float | str:
    """Mean ms per call over `keys` (each a new shape), after one call at an unused length."""
    try:
        with sdpa_kernel(backends) if backends else contextlib.nullcontext():  # None: torch's own choice
            for i, k in enumerate([keys[0] - 1] + keys):
                if i == 1:  # the first call (another length) only warms up
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                qq = torch.randn(b, 6, q, 32, device="cuda", dtype=dtype)
                kk = torch.randn(b, 2, k, 32, device="cuda", dtype=dtype)
                vv = torch.randn(b, 2, k, 32, device="cuda", dtype=dtype)
                mask = torch.rand(b, 1, q, k, device="cuda") < 0.9
                mask[..., 0] = True
                F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, enable_gqa=True)
            torch.cuda.synchronize()
        return round(1e3 * (time.perf_counter() - t) / len(keys), 3)
    except RuntimeError as e:
        return f"error: {str(e)[:120]}"


def main() -> int:
    sets = {"default": None, "no_cudnn": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                                      SDPBackend.MATH],
            "cudnn_only": [SDPBackend.CUDNN_ATTENTION], "efficient_only": [SDPBackend.EFFICIENT_ATTENTION]}
    out = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
           "cudnn": torch.backends.cudnn.version()}
    for dtype in (torch.bfloat16, torch.float32):
        for b, q in ((8, 9), (32, 1)):
            keys = list(range(70, 110, 2))  # 20 new key lengths
            name = f"{str(dtype).removeprefix('torch.')} B={b} Q={q}"
            out[name] = {s: timed(v, dtype, b, q, keys) for s, v in sets.items()}
            out[name]["same_shape_default"] = timed(sets["default"], dtype, b, q, [keys[0]] * 20)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
