"""Speed of the speculation kernels, printed as JSON: `python -m sglang_slo.spec.bench`.

- select_trees / trim_chains on random instances of simulator size (hundreds of requests);
- one speculation round (beam search -> selection -> sub-trees -> verify) with the table LM
  pair on a device, greedy and sampled, with the acceptance it reaches.
Provides `add_arguments(parser)` and `run(args) -> int` like the CLI subcommands.
"""

from __future__ import annotations

import argparse
import json
import random
import time


def _timed(fn, repeats: int, clock=time.perf_counter) -> float:
    """Fastest time of fn() over `repeats` runs, milliseconds (the minimum, because the CPU
    may be shared: noise only ever adds time). clock=time.process_time measures this
    process's CPU time, which other processes on a busy machine do not inflate."""
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append((clock() - t0) * 1e3)
    return min(times)


def _random_beam_candidates(rng: random.Random, depth: int, width: int):
    """A beam-search-shaped candidate tree: `width` nodes per level, f decreasing."""
    from sglang_slo.spec.select import TreeCandidates

    parent, f = [-1], [1.0]
    prev = [0]
    for _ in range(depth):
        level = []
        for _ in range(width):
            p = rng.choice(prev)
            parent.append(p)
            f.append(f[p] * rng.uniform(0.2, 0.95))
            level.append(len(f) - 1)
        prev = level
    return TreeCandidates(f, parent, min_tokens=rng.uniform(1.0, 4.0), tree_cap=rng.randint(4, 16))


def bench_select(requests: int, depth: int, width: int, repeats: int, seed: int) -> dict:
    from sglang_slo.spec.select import select_trees, trim_chains

    rng = random.Random(seed)
    cands = [_random_beam_candidates(rng, depth, width) for _ in range(requests)]
    budget = requests * 6
    sel = select_trees(cands, budget)
    conf = [[rng.uniform(0.3, 1.0) for _ in range(depth)] for _ in range(requests)]
    return {
        "requests": requests, "nodes_per_tree": 1 + depth * width, "budget": budget,
        "select_trees_cpu_ms": round(_timed(lambda: select_trees(cands, budget), repeats, time.process_time), 3),
        "trim_chains_cpu_ms": round(_timed(lambda: trim_chains(conf, budget), repeats, time.process_time), 3),
        "slo_targets_met": sum(sel.reached), "tokens_used": sel.total_tokens,
    }


def bench_round(device: str, requests: int, depth: int, width: int, vocab: int,
                temperature: float, repeats: int, seed: int) -> dict:
    """One speculation round for `requests` requests on `device`."""
    import torch

    from sglang_slo.spec.select import select_trees
    from sglang_slo.spec.table_lm import TableLM
    from sglang_slo.spec.tree import ancestor_mask, build_trees
    from sglang_slo.spec.verify import verify_batch

    target = TableLM.random(vocab, seed, device=device)
    draft = target.perturbed(noise=1.0, seed=seed + 1)
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(4)] for _ in range(requests)]
    roots = torch.tensor([p[-1] for p in prompts], device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    step = draft.draft_step(prompts)
    stats = {}

    def one_round():
        trees = build_trees(step, roots, depth, width)
        t1 = time.perf_counter()
        sel = select_trees([t.candidates(2.5, 12) for t in trees], budget=requests * 6)
        subs = [t.subtree(n) for t, n in zip(trees, sel.nodes)]
        masks = [ancestor_mask(s) for s in subs]
        t2 = time.perf_counter()
        logits = torch.cat([target.tree_logits(s, p) for s, p in zip(subs, prompts)])
        t3 = time.perf_counter()
        res = verify_batch(subs, logits, [temperature] * requests, [1.0] * requests, gen)
        t4 = time.perf_counter()
        stats.update(select_ms=(t2 - t1) * 1e3, verify_ms=(t4 - t3) * 1e3,
                     accepted=sum(r.accepted for r in res) / requests, masks=len(masks))
        return res

    ms = _timed(one_round, repeats)
    return {
        "device": device, "requests": requests, "depth": depth, "width": width, "vocab": vocab,
        "temperature": temperature, "round_ms": round(ms, 3),
        "select_subtree_mask_ms": round(stats["select_ms"], 3),
        "verify_ms": round(stats["verify_ms"], 3),
        "mean_accepted_per_request": round(stats["accepted"], 3),
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, nargs="+", default=[64, 256, 512],
                   help="batch sizes for the selection benchmark")
    p.add_argument("--depth", type=int, default=8, help="draft depth (beam levels)")
    p.add_argument("--width", type=int, default=3, help="beam width")
    p.add_argument("--device", default="cpu", help="torch device for the speculation round")
    p.add_argument("--round-requests", type=int, default=32, help="batch size of the speculation round")
    p.add_argument("--vocab", type=int, default=256, help="table LM vocabulary size")
    p.add_argument("--repeats", type=int, default=20, help="timed repetitions (fastest reported)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--json", action="store_true", help="print JSON (always on; for CLI symmetry)")


def run(args: argparse.Namespace) -> int:
    out = {
        "select": [bench_select(n, args.depth, args.width, args.repeats, args.seed) for n in args.requests],
        "round": [bench_round(args.device, args.round_requests, args.depth, args.width, args.vocab,
                              temp, max(3, args.repeats // 4), args.seed) for temp in (0.0, 1.0)],
    }
    print(json.dumps(out, indent=1))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
