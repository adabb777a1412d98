"""Forward-pass timings of the tiny target and draft (prints JSON).

    OMP_NUM_THREADS=1 python -m sglang_slo.engine.forward_bench [--model-dir DIR] [--context 128]

For each batch size: milliseconds per decode forward (metadata build + forward + logits of
the batch's rows), split into `build_ms` (AttentionBatch.build) and `forward_ms`; the same
for a verify step with an 8-node tree per sequence. Times are medians of this thread's CPU
time (robust when other processes share the cores); `wall_ms` is the wall-clock median. `overhead_fraction` estimates how much
of a forward is fixed per-op cost (Python + dispatch) rather than arithmetic: the time of a
model with the same layer count and op sequence but width 16 divided by the real time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sglang_slo.engine.attention import AttentionBatch, SequenceInput
from sglang_slo.engine.config import ModelConfig
from sglang_slo.engine.kv_cache import KVCache, blocks_needed
from sglang_slo.engine.loader import load_model
from sglang_slo.engine.model import LlamaForCausalLM


def _chain_tree_mask(n: int) -> torch.Tensor:
    """Two branches under a root: nodes 1..n/2 on one chain, the rest on another."""
    parents = [-1] + [0 if i in (1, n // 2 + 1) else i - 1 for i in range(1, n)]
    mask = torch.eye(n, dtype=torch.bool)
    for i in range(1, n):
        mask[i] |= mask[parents[i]]
    return mask


@torch.inference_mode()
def time_steps(model: LlamaForCausalLM, batch_size: int, context: int, query_len: int,
               iters: int, block_size: int = 16) -> dict:
    """Median per-step times of `iters` forwards of `batch_size` sequences at `context`."""
    cfg = model.config
    per_seq = blocks_needed(context + query_len, block_size)
    kv = KVCache.for_model(cfg, per_seq * batch_size, block_size,
                           dtype=next(model.parameters()).dtype)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch_size)]
    gen = torch.Generator().manual_seed(0)
    mask = _chain_tree_mask(query_len) if query_len > 1 else None
    ids = torch.randint(0, cfg.vocab_size, (batch_size * query_len,), generator=gen)
    build, fwd, wall = [], [], []
    for _ in range(iters + 3):
        w0, t0 = time.perf_counter(), time.thread_time()
        batch = AttentionBatch.build([SequenceInput(t, context, query_len, tree_mask=mask)
                                      for t in tables], block_size)
        t1 = time.thread_time()
        hidden = model.forward(ids, batch.positions, batch, kv)
        model.logits(hidden if query_len > 1 else hidden[batch.last_rows])
        t2, w2 = time.thread_time(), time.perf_counter()
        build.append(t1 - t0)
        fwd.append(t2 - t1)
        wall.append(w2 - w0)

    def median_ms(xs: list[float]) -> float:
        xs = sorted(xs[3:])
        return xs[len(xs) // 2] * 1e3

    b, f = median_ms(build), median_ms(fwd)
    return {"batch": batch_size, "query_len": query_len, "context": context,
            "build_ms": round(b, 3), "forward_ms": round(f, 3), "step_ms": round(b + f, 3),
            "wall_ms": round(median_ms(wall), 3),
            "tokens_per_s": round(batch_size * query_len / ((b + f) / 1e3), 1)}


def _floor_model(cfg: ModelConfig) -> LlamaForCausalLM:
    """Same layers and ops as cfg, negligible arithmetic (width 16, vocab 64)."""
    small = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=16,
                        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=2,
                        num_key_value_heads=1 if cfg.num_key_value_heads < cfg.num_attention_heads
                        else 2, head_dim=8, max_position_embeddings=cfg.max_position_embeddings,
                        tie_word_embeddings=cfg.tie_word_embeddings)
    return LlamaForCausalLM(small).eval()


def bench_model(model: LlamaForCausalLM, context: int, iters: int,
                batches: list[int]) -> dict:
    decode = [time_steps(model, b, context, 1, iters) for b in batches]
    floor = [time_steps(_floor_model(model.config), b, context, 1, iters) for b in batches]
    for d, f in zip(decode, floor):
        d["overhead_fraction"] = round(min(1.0, f["step_ms"] / d["step_ms"]), 3)
        d["build_fraction"] = round(d["build_ms"] / d["step_ms"], 3)
    verify = [time_steps(model, b, context, 8, iters) for b in batches[:2]]
    return {"params": model.config.num_parameters, "layers": model.config.num_hidden_layers,
            "hidden": model.config.hidden_size, "decode": decode, "verify_tree8": verify}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=None,
                   help="directory with target/ and draft/ (default: the committed tiny pair)")
    p.add_argument("--context", type=int, default=128, help="cached tokens per sequence")
    p.add_argument("--iters", type=int, default=30, help="timed steps per point")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = p.parse_args()
    torch.set_num_threads(1)
    from sglang_slo.engine.train_tiny import ensure_tiny_pair
    root = Path(args.model_dir) if args.model_dir else ensure_tiny_pair()
    dtype = getattr(torch, args.dtype)
    result = {"torch_threads": torch.get_num_threads(), "dtype": args.dtype}
    for role in ("target", "draft"):
        result[role] = bench_model(load_model(root / role, dtype=dtype), args.context,
                                   args.iters, args.batches)
    t, d = result["target"]["decode"], result["draft"]["decode"]
    result["draft_to_target_step_ratio"] = [round(x["step_ms"] / y["step_ms"], 3)
                                            for x, y in zip(d, t)]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
