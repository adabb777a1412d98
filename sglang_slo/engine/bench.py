"""`sglang-slo bench-engine`: embedded engine throughput with and without speculation (JSON).

    OMP_NUM_THREADS=1 sglang-slo bench-engine --json                  # the committed tiny pair
    sglang-slo bench-engine --pair DIR --json                          # DIR/target, DIR/draft
    sglang-slo bench-engine --random-model 2,256,1024,4,4096 --json    # a random-init model of
                                                                       # a given shape (no spec)
    sglang-slo bench-engine --device cuda --dtype bfloat16 --json      # on the GPU

Measures, greedy, prompts cut from Python stdlib sources (random ids for --random-model):
- single stream tokens/s without speculation and with it (beam trees of --depth/--width,
  --tree-cap nodes), their ratio, and the mean accepted draft tokens per verify;
- aggregate tokens/s at each --concurrency (all requests submitted at once), without and
  with speculation;
- tokens per CPU second of the engine thread next to tokens per wall second: on a shared
  machine the first is the engine's own speed, the second what it got under the load (on
  CUDA the thread's CPU time is the host side only: read the wall numbers);
- Python overhead per iteration as a fraction of model time: (iteration wall time -
  model time) / model time, from the engine's own IterationReports (`forward_s` is the time
  inside the models' forward + LM head calls, GPU work included on CUDA; everything else --
  scheduling, attention metadata, beam bookkeeping, selection, verification, KV commit --
  counts as overhead).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch

from protos import messages as protos
from sglang_slo.engine.config import ModelConfig
from sglang_slo.engine.device import Placement, add_device_arguments
from sglang_slo.engine.engine import Engine, EngineConfig
from sglang_slo.engine.loader import load_model
from sglang_slo.engine.model import LlamaForCausalLM
from sglang_slo.engine.request import SamplingParams
from sglang_slo.engine.scheduler import SchedulerConfig

_SLO = protos.Slo(ttft_s=10.0, tpot_s=1.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pair", default=None, help="directory with target/ and draft/ (default: the tiny pair)")
    parser.add_argument("--model", default=None, help="target model directory (overrides --pair)")
    parser.add_argument("--draft", default=None, help="draft model directory (with --model)")
    parser.add_argument("--random-model", default=None, metavar="L,H,I,HEADS,VOCAB",
                        help="benchmark a random-init Llama of this shape instead (no speculation)")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=128, help="output tokens per request")
    parser.add_argument("--depth", type=int, default=8,
                        help="most draft tree depth (chains stop early on low draft confidence; 8: best "
                             "measured with the distilled tiny draft, see --sweep)")
    parser.add_argument("--width", type=int, default=1, help="draft tree width (1 = chain)")
    parser.add_argument("--tree-cap", type=int, default=0, help="verify tokens per request (0 = 1 + depth*width)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32], help="concurrent requests")
    parser.add_argument("--single-prompts", type=int, default=4,
                        help="single stream: prompts run one after another (acceptance varies by prompt)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="single stream: passes over the prompts (summed); concurrent: runs (best kept)")
    parser.add_argument("--sweep", action="store_true",
                        help="also sweep single-stream speculation over depth x width and report each")
    parser.add_argument("--json", action="store_true", help="print only the JSON summary")
    add_device_arguments(parser)


def _models(args, where: Placement) -> tuple[LlamaForCausalLM, LlamaForCausalLM | None, str]:
    dtype, device = where.torch_dtype, where.device
    if args.random_model:
        layers, hidden, inter, heads, vocab = (int(x) for x in args.random_model.split(","))
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                          num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=heads, max_position_embeddings=2048)
        return LlamaForCausalLM(cfg).eval().to(device, dtype), None, f"random {args.random_model}"
    if args.model:
        return (load_model(args.model, dtype=dtype, device=device),
                load_model(args.draft, dtype=dtype, device=device) if args.draft else None, args.model)
    from sglang_slo.engine.train_tiny import ensure_tiny_pair

    pair = Path(args.pair) if args.pair else ensure_tiny_pair()
    return (load_model(pair / "target", dtype=dtype, device=device),
            load_model(pair / "draft", dtype=dtype, device=device), str(pair))


def bench_prompts(n: int, length: int, vocab: int, model_dir: str | None, seed: int = 0) -> list[list[int]]:
    """n prompts of `length` tokens: windows of tokenized stdlib sources, or random ids."""
    rng = random.Random(seed)
    tok_dir = Path(model_dir) / "target" if model_dir and (Path(model_dir) / "target").is_dir() else model_dir
    if tok_dir and (Path(tok_dir) / "tokenizer.json").is_file():
        from sglang_slo.engine.tokenizer import Tokenizer, read_texts, stdlib_text_files

        tok = Tokenizer.load(tok_dir)
        files = sorted(stdlib_text_files())
        ids: list[int] = []
        for text in read_texts(rng.sample(files, min(40, len(files))), 50 * length * 8):
            ids += tok.encode(text)
        if len(ids) > 2 * length:
            starts = [rng.randrange(0, len(ids) - length) for _ in range(n)]
            return [ids[s: s + length] for s in starts]
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]


def run_point(target, draft, prompts, new_tokens, depth=0, width=1, tree_cap=0,
              where: Placement = Placement()) -> dict:
    """All prompts at once, greedy, to completion; returns throughput and per-step stats.
    (Every step ends with the logits on the host, so wall times include the GPU's work.)"""
    spec = draft is not None and depth > 0
    cap = tree_cap or 1 + depth * width
    sched = SchedulerConfig(max_batch_tokens=8192, max_running=max(64, len(prompts)),
                            max_depth=depth if spec else 0, max_width=width,
                            fallback_budget=8192, fallback_depth=depth if spec else 0,
                            fallback_width=width, fallback_tree_cap=cap if spec else 1)
    eng = Engine(target, draft if spec else None,
                 EngineConfig(kv_capacity_tokens=max(4096, len(prompts) * (len(prompts[0]) + new_tokens + 64)),
                              block_size=16, scheduler=sched, device=where.device, dtype=where.dtype))
    for i, p in enumerate(prompts):
        eng.add_request(f"b{i}", p, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True), _SLO)
    tokens, steps, forward_s, wall_iter, verifies, accepted = 0, 0, 0.0, 0.0, 0, 0
    decode_wall, decode_tokens = 0.0, 0
    full_wall, full_tokens = 0.0, 0  # decode iterations with every request still running
    t0, c0 = time.perf_counter(), time.thread_time()
    while eng.has_work:
        out = eng.step()
        r = out.report
        n = sum(len(v) for v in out.new_tokens.values())
        tokens += n
        steps += 1
        forward_s += r.forward_s
        wall_iter += r.end_s - r.start_s
        if not r.prefill_tokens:
            decode_wall += r.end_s - r.start_s
            decode_tokens += n
            if len(r.progress) == len(prompts):
                full_wall += r.end_s - r.start_s
                full_tokens += n
        for p in r.progress:
            if p.verified:
                verifies += 1
                accepted += p.accepted
    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    return {
        "tokens_per_s": round(tokens / wall, 1),
        "tokens_per_cpu_s": round(tokens / cpu, 1),
        "decode_tokens_per_s": round(decode_tokens / decode_wall, 1) if decode_wall else 0.0,
        # While the whole batch decodes (a server keeping it full): speculation's requests
        # finish at different times, and the closed batch's tail runs few of them.
        "full_batch_tokens_per_s": round(full_tokens / full_wall, 1) if full_wall else 0.0,
        "iterations": steps,
        "ms_per_iteration": round(1e3 * wall_iter / steps, 3),
        "python_overhead_fraction": round((wall_iter - forward_s) / forward_s, 4) if forward_s else 0.0,
        "mean_accepted_per_verify": round(accepted / verifies, 3) if verifies else 0.0,
        "verifies": verifies,
        "wall_s": round(wall, 3),
    }


def _combine(runs: list[dict]) -> dict:
    """Aggregate sequential runs: rates from summed tokens and times."""
    wall = sum(r["wall_s"] for r in runs)
    tokens = sum(r["tokens_per_s"] * r["wall_s"] for r in runs)
    cpu = sum(r["tokens_per_s"] * r["wall_s"] / r["tokens_per_cpu_s"] for r in runs)
    iters = sum(r["iterations"] for r in runs)
    verifies = sum(r["verifies"] for r in runs)
    return {
        "tokens_per_s": round(tokens / wall, 1), "tokens_per_cpu_s": round(tokens / cpu, 1),
        "iterations": iters, "ms_per_iteration": round(sum(r["ms_per_iteration"] * r["iterations"] for r in runs) / iters, 3),
        "python_overhead_fraction": round(sum(r["python_overhead_fraction"] * r["iterations"] for r in runs) / iters, 4),
        "mean_accepted_per_verify": round(sum(r["mean_accepted_per_verify"] * r["verifies"] for r in runs) / verifies, 3)
        if verifies else 0.0,
        "verifies": verifies, "wall_s": round(wall, 3), "runs": len(runs),
        "full_batch_tokens_per_s": max(r["full_batch_tokens_per_s"] for r in runs),
    }


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    place = Placement.from_args(args)
    target, draft, where = _models(args, place)
    vocab = target.config.vocab_size
    room = target.config.max_position_embeddings - args.new_tokens - 1
    plen = max(1, min(args.prompt_len, room))
    src = args.pair or args.model or (where if not args.random_model else None)
    max_conc = max([args.single_prompts] + args.concurrency)
    prompts = bench_prompts(max_conc, plen, vocab, src)
    run_point(target, draft, prompts[:1], 8, where=place)  # warm-up (allocator, first-call paths)
    if draft is not None and args.depth > 0:  # and the speculative paths (CUDA: their kernels)
        run_point(target, draft, prompts[:2], 8, args.depth, args.width, args.tree_cap, place)
    out: dict = {
        "model": where, **place.describe(), "omp_num_threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 2),
        "prompt_tokens": plen, "new_tokens": args.new_tokens,
        "spec": {"depth": args.depth, "width": args.width, "tree_cap": args.tree_cap or 1 + args.depth * args.width},
    }
    singles = prompts[: args.single_prompts]
    # Single stream: each prompt alone in the engine. Plain and speculative runs are
    # interleaved prompt by prompt (A/B/A/B...), so a shared machine's load drift hits every
    # configuration alike and the ratios stay meaningful.
    configs = {"plain": (None, 0, 1, 0)}
    if draft is not None and args.depth > 0:
        configs["spec"] = (draft, args.depth, args.width, args.tree_cap)
        if args.sweep:
            for d, w in [(2, 1), (3, 1), (4, 1), (5, 1), (6, 1), (8, 1), (3, 2), (4, 2)]:
                configs[f"d{d}w{w}"] = (draft, d, w, 0)
    runs: dict[str, list[dict]] = {k: [] for k in configs}
    for _ in range(max(1, args.repeats)):
        for p in singles:
            for name, (dm, d, w, cap) in configs.items():
                runs[name].append(run_point(target, dm, [p], args.new_tokens, d, w, cap, place))
    single = {k: _combine(v) for k, v in runs.items()}
    base = out["single_stream"] = single["plain"]
    if "spec" in single:
        spec = out["single_stream_spec"] = single["spec"]
        out["spec_speedup"] = round(spec["tokens_per_s"] / base["tokens_per_s"], 3)
        out["spec_speedup_cpu"] = round(spec["tokens_per_cpu_s"] / base["tokens_per_cpu_s"], 3)
    if args.sweep and "spec" in single:
        out["spec_sweep"] = [
            {"depth": configs[k][1], "width": configs[k][2], "tokens_per_s": r["tokens_per_s"],
             "tokens_per_cpu_s": r["tokens_per_cpu_s"], "mean_accepted_per_verify": r["mean_accepted_per_verify"],
             "speedup": round(r["tokens_per_s"] / base["tokens_per_s"], 3),
             "speedup_cpu": round(r["tokens_per_cpu_s"] / base["tokens_per_cpu_s"], 3)}
            for k, r in single.items() if k.startswith("d")]
    out["concurrent"] = {}
    for c in args.concurrency:  # all c requests at once; plain and spec runs alternate
        point: dict[str, list[dict]] = {"plain": []}
        if "spec" in configs:
            point["spec"] = []
        for _ in range(max(1, args.repeats)):
            for name in point:
                dm, d, w, cap = configs[name]
                point[name].append(run_point(target, dm, prompts[:c], args.new_tokens, d, w, cap, place))
        out["concurrent"][str(c)] = {k: _combine(v) for k, v in point.items()}
        if "spec" in point:
            res = out["concurrent"][str(c)]
            res["spec_speedup"] = round(res["spec"]["tokens_per_s"] / res["plain"]["tokens_per_s"], 3)
            if res["plain"]["full_batch_tokens_per_s"]:
                res["spec"]["full_batch_speedup"] = round(
                    res["spec"]["full_batch_tokens_per_s"] / res["plain"]["full_batch_tokens_per_s"], 3)
    out["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))
