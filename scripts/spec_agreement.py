"""Greedy speculative vs plain output of the embedded engine on the tiny pair, per dtype (JSON).

    python scripts/spec_agreement.py --device cuda

Float32 must agree token for token (tests/test_engine_cuda.py asserts it). In bfloat16 the
same sequence computed in other batch shapes (a verify tree of k tokens vs k decode steps,
chunked prefill vs one pass) rounds differently, and a near-tie of two logits can flip the
argmax: this reports how often, and where, rather than asserting.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from protos import messages as protos
from sglang_slo.engine.bench import bench_prompts
from sglang_slo.engine.engine import Engine, EngineConfig
from sglang_slo.engine.loader import load_model
from sglang_slo.engine.request import SamplingParams
from sglang_slo.engine.scheduler import SchedulerConfig

TINY = Path(__file__).resolve().parents[1] / "sglang_slo" / "assets" / "tiny"
SLO = protos.Slo(ttft_s=10.0, tpot_s=1.0)


def greedy_outputs(target, draft, prompts, device: str, dtype: str, depth: int, width: int,
                   new_tokens: int) -> dict[str, list[int]]:
    """All prompts at once to completion under the local fallback (depth 0 = plain)."""
    sched = SchedulerConfig(max_batch_tokens=1024, max_running=64, max_depth=8, max_width=4,
                            fallback_budget=1024, fallback_depth=depth, fallback_width=width,
                            fallback_tree_cap=1 + depth * width)
    eng = Engine(target, draft if depth else None,
                 EngineConfig(kv_capacity_tokens=8192, block_size=16, scheduler=sched, device=device, dtype=dtype))
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True), SLO)
    out: dict[str, list[int]] = {}
    while eng.has_work:
        for f in eng.step().finished:
            out[f.rid] = f.output_ids
    eng.check_kv()
    return out


def compare(ref: dict[str, list[int]], got: dict[str, list[int]]) -> dict:
    first = []  # index of the first differing token, per diverging request
    for rid, a in ref.items():
        b = got[rid]
        d = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if d is not None:
            first.append(d)
    n = len(ref)
    return {"requests": n, "identical": n - len(first), "first_divergence": sorted(first)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=96)
    args = p.parse_args()
    rng = random.Random(0)
    prompts = [x[: rng.randint(8, 64)] for x in bench_prompts(args.prompts, 64, 2048, str(TINY), seed=7)]
    result: dict = {"device": args.device, "prompts": len(prompts), "new_tokens": args.new_tokens}
    for dtype in args.dtypes.split(","):
        td = getattr(torch, dtype)
        target = load_model(TINY / "target", dtype=td, device=args.device)
        draft = load_model(TINY / "draft", dtype=td, device=args.device)
        plain = greedy_outputs(target, draft, prompts, args.device, dtype, 0, 1, args.new_tokens)
        result[dtype] = {f"d{d}w{w}": compare(plain, greedy_outputs(target, draft, prompts, args.device, dtype,
                                                                    d, w, args.new_tokens))
                         for d, w in ((4, 1), (8, 1), (4, 2), (3, 3))}
        # The same plain run with another batch (one request at a time): batch-shape numerics alone.
        alone = {}
        for i, pr in enumerate(prompts[:8]):
            alone[f"r{i}"] = greedy_outputs(target, draft, [pr], args.device, dtype, 0, 1, args.new_tokens)["r0"]
        result[dtype]["plain_alone_vs_batched"] = compare({k: plain[k] for k in alone}, alone)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
