"""`sglang-slo profile`: measure the embedded engine's iteration times, fit the planner's cost
model, and write a hardware profile YAML (schema: configs/hardware/README.md).

    OMP_NUM_THREADS=1 sglang-slo profile --model DIR/target --draft DIR/draft \\
        --out configs/hardware/cpu-tiny.yaml

Every sample is a real `Engine.step()`: short episodes with a fixed plan (concurrency,
prompt length, prefill chunk, draft depth/width) sweep (prefill tokens, verify tokens, draft
steps, context tokens); each IterationReport gives one row (prefill, verify, draft_steps,
context, draft_tokens, seconds = end_s - start_s), exactly what the planner's online refit
sees. Prompt lengths vary within an episode (attention pads to the longest). Randomly mixed
episodes (every step draws its own chunk/depth/width/budget) join the training rows; another
set of them, from other seeds, is held out and reports the fitted model's prediction error
(overall and per iteration kind). The whole sweep runs --repeats times and each iteration
keeps its fastest run, runs minutes apart. Per-position greedy acceptance of chains is
measured on the way and written as the profile's acceptance prior.

With `--device cuda` the fit uses each step's wall time instead of its thread CPU time (the
GPU's work is not the host thread's CPU time; each step ends with its logits on the host):

    sglang-slo profile --device cuda --model DIR/target --draft DIR/draft --out configs/hardware/h200-tiny.yaml
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from protos import messages as protos
from sglang_slo.engine.bench import bench_prompts
from sglang_slo.engine.device import Placement, add_device_arguments
from sglang_slo.engine.engine import Engine, EngineConfig
from sglang_slo.engine.loader import load_model
from sglang_slo.engine.request import SamplingParams
from sglang_slo.engine.scheduler import SchedulerConfig
from sidecar.cost_model import CostModel, EngineLimits, report_features

_SLO = protos.Slo(ttft_s=10.0, tpot_s=1.0)
MAX_DEPTH, MAX_WIDTH = 8, 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="target model directory (HF format)")
    parser.add_argument("--draft", default=None, help="draft model directory (enables speculation samples)")
    parser.add_argument("--out", required=True, help="profile YAML to write")
    parser.add_argument("--name", default=None, help="profile name (default: the file stem)")
    parser.add_argument("--kv-capacity-tokens", type=int, default=65536, help="KV slots of the profiled engine")
    parser.add_argument("--max-batch-tokens", type=int, default=2048, help="largest forward the engine runs")
    parser.add_argument("--new-tokens", type=int, default=12, help="output tokens per request in an episode")
    parser.add_argument("--repeats", type=int, default=5,
                        help="run the whole sweep this often; identical iterations keep --timing of their times")
    parser.add_argument("--timing", choices=["min", "mean"], default="min",
                        help="per iteration over the repeats: min (contention only adds time) or mean")
    parser.add_argument("--grid", choices=["full", "quick", "smoke"], default="full",
                        help="sweep size: full (the profile), quick (~1/4), smoke (tests only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dump-rows", default=None, help="also write the raw (train, held-out) rows as JSON here")
    add_device_arguments(parser)


def _engine(target, draft, args, spec: bool, place: Placement) -> Engine:
    sched = SchedulerConfig(max_batch_tokens=args.max_batch_tokens, max_running=256,
                            max_depth=MAX_DEPTH if spec else 0, max_width=MAX_WIDTH,
                            fallback_budget=args.max_batch_tokens)
    return Engine(target, draft if spec else None,
                  EngineConfig(kv_capacity_tokens=args.kv_capacity_tokens, block_size=16, scheduler=sched,
                               device=place.device, dtype=place.dtype))


def episode(engine: Engine, prompts: list[list[int]], new_tokens: int, chunk: int, depth: int, width: int,
            cap: int, budget: int, rng: random.Random | None = None) -> tuple[list[tuple], list[int]]:
    """Run prompts to completion under a plan fixing the shapes; rows and accepted counts.

    Rows: (prefill, verify, draft_steps, context, draft_tokens, cpu_s, wall_s, requests,
    spec_requests, tree_tokens): cpu_s is the step's CPU time on this thread (OMP=1: all
    compute; the cost of the work itself, immune to other processes on a shared machine),
    wall_s its end_s - start_s; the rest as `report_features` reads them off the report.

    With `rng`, every step draws its own chunk/depth/width/budget (held-out mixes).
    """
    for i, p in enumerate(prompts):
        engine.add_request(f"p{time.monotonic_ns()}-{i}", p, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True), _SLO)
    rows, accepted = [], []
    while engine.has_work:
        if rng is not None:
            chunk, depth = rng.choice([8, 32, 128, 512]), rng.randint(0, 6)
            width = rng.randint(1, 3)
            cap, budget = rng.randint(1, 1 + depth * width), rng.choice([64, 256, 1024, 2048])
        live = list(engine.requests.values())
        engine.apply_plan(protos.Plan(
            step=engine.step_index, valid_until_s=float("inf"), token_budget=budget,
            prefill=[protos.PrefillChunk(r.rid, chunk) for r in live if r.is_prefilling or not r.output_ids],
            decode=[protos.DecodeEntry(r.rid, min_tokens=1.0, tree_cap=cap, depth=depth, width=width) for r in live]))
        cpu0 = time.thread_time()
        out = engine.step()
        cpu = time.thread_time() - cpu0  # seconds of CPU on this thread (OMP=1: all compute)
        r = out.report
        f = report_features(r)
        if r.prefill_tokens + r.verify_tokens:
            rows.append((*f[:5], cpu, r.end_s - r.start_s, *f[5:]))
        accepted += [p.accepted for p in r.progress if p.verified]
    return rows, accepted


def combine(runs: list[list[tuple]], stat: str = "min") -> list[tuple]:
    """Rows of one episode run several times (`runs[0]` first): each row's seconds become
    the minimum (default) or the mean over the runs whose row has the same features
    (deterministic episodes repeat exactly; a run of another length is skipped). On a
    shared machine contention only ever adds time, so the minimum estimates the work's own
    cost best (as `timeit` does); the planner's online scale absorbs the contention of the
    moment."""
    rows = runs[0]
    times = [[(r[5], r[6])] for r in rows]  # per row: (cpu_s, wall_s) of each matching run
    for again in runs[1:]:
        if len(again) != len(rows):
            continue
        for i, (a, b) in enumerate(zip(rows, again)):
            if a[:5] == b[:5] and a[7:] == b[7:]:
                times[i].append((b[5], b[6]))
    pick = min if stat == "min" else (lambda xs: sum(xs) / len(xs))
    return [tuple(r[:5]) + (pick([t[0] for t in ts]), pick([t[1] for t in ts])) + tuple(r[7:])
            for r, ts in zip(rows, times)]


def grid(size: str, spec: bool):
    """(concurrency, prompt_len, chunk, depth, width) points of the training sweep."""
    if size == "smoke":
        return list(itertools.product([2], [16], [32], [(0, 1)] + [(2, 1)] * spec))
    quick = size == "quick"
    conc = [1, 4, 16] if quick else [1, 2, 4, 8, 16, 32]
    plens = [16, 96] if quick else [24, 160]
    chunks = [32, 512] if quick else [64, 512]
    shapes = [(0, 1)] + ([(2, 1), (4, 1), (3, 2)] if quick else [(1, 1), (2, 1), (4, 1), (6, 1), (3, 2)]) * spec
    return list(itertools.product(conc, plens, chunks, shapes))


def conditional_acceptance(accepted: list[int], depth: int) -> list[float]:
    """alpha_j = P(accept >= j | accept >= j-1) from chain verifies of `depth` drafts."""
    a = np.asarray(accepted)
    out = []
    for j in range(1, depth + 1):
        reached = (a >= j - 1).sum()
        out.append(float((a >= j).sum() / reached) if reached else 0.0)
    return [round(min(x, 0.99), 3) for x in out]


def seconds(rows: list[tuple], wall: bool = False) -> list[tuple]:
    """9-column rows for CostModel.fit (features, CPU (default) or wall seconds, request
    counts)."""
    return [r[:5] + (r[6] if wall else r[5],) + tuple(r[7:10]) for r in rows]


def prediction_error(model: CostModel, rows: list[tuple]) -> dict:
    """Absolute percentage errors of `model` on rows from `seconds()` (6 or 9 columns)."""
    meas = np.array([r[5] for r in rows])
    pred = np.array([model.iteration_time(*map(int, r[:5] + tuple(r[6:9]))) for r in rows])
    ape = np.abs(pred - meas) / meas
    return {"iterations": len(rows), "mape": round(float(ape.mean()), 4), "median_ape": round(float(np.median(ape)), 4),
            "p90_ape": round(float(np.quantile(ape, 0.9)), 4),
            "total_time_error": round(float(abs(pred.sum() - meas.sum()) / meas.sum()), 4)}


def iteration_kind(row: tuple) -> str:
    """What an iteration ran (rows from `episode` or `seconds`): 'prefill' (chunks only),
    'mixed' (chunks and decodes in one forward), 'decode' (plain decode, no drafting),
    'spec' (drafted chains), 'tree' (a verified tree wider than a chain)."""
    prefill, verify, steps = row[0], row[1], row[2]
    if prefill:
        return "mixed" if verify else "prefill"
    if not steps:
        return "decode"
    return "tree" if row[-1] else "spec"


def error_by_kind(model: CostModel, rows: list[tuple]) -> dict:
    """Per `iteration_kind`: iterations, mean signed error (bias: (predicted - measured) /
    measured, negative = the model is too fast) and MAPE of `model` on rows from `seconds()`."""
    out = {}
    for kind in ("prefill", "mixed", "decode", "spec", "tree"):
        sub = [r for r in rows if iteration_kind(r) == kind]
        if not sub:
            continue
        meas = np.array([r[5] for r in sub])
        pred = np.array([model.iteration_time(*map(int, r[:5] + tuple(r[6:9]))) for r in sub])
        rel = (pred - meas) / meas
        out[kind] = {"iterations": len(sub), "bias": round(float(rel.mean()), 4),
                     "mape": round(float(np.abs(rel).mean()), 4)}
    return out


def online_prediction_error(model: CostModel, rows: list[tuple]) -> dict:
    """Errors of one-step-ahead predictions as the planner makes them: each row (in measured
    order) is predicted, then observed by the cost model's online scale (EWMA of measured /
    predicted; the windowed refit off). On a shared machine the scale absorbs the load's
    slow drift, which a static fit cannot."""
    online = CostModel(**model.coefficients(), ewma=model.ewma, refit_every=0)
    meas, pred = [], []
    for r in rows:
        feats = tuple(map(int, r[:5] + tuple(r[6:9])))
        pred.append(online.iteration_time(*feats))
        meas.append(r[5])
        online.observe_features(feats, r[5])
    meas_a, pred_a = np.array(meas), np.array(pred)
    ape = np.abs(pred_a - meas_a) / meas_a
    return {"iterations": len(rows), "mape": round(float(ape.mean()), 4), "median_ape": round(float(np.median(ape)), 4),
            "p90_ape": round(float(np.quantile(ape, 0.9)), 4)}


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t_start = time.perf_counter()
    place = Placement.from_args(args)
    wall = place.is_cuda  # the time the fit uses: wall on a GPU, else the thread's CPU time
    target = load_model(args.model, dtype=place.torch_dtype, device=place.device)
    draft = load_model(args.draft, dtype=place.torch_dtype, device=place.device) if args.draft else None
    vocab = target.config.vocab_size
    room = target.config.max_position_embeddings - args.new_tokens - 2
    pool = bench_prompts(64, room, vocab, args.model, seed=args.seed)
    rng = random.Random(args.seed)
    engine = _engine(target, draft, args, draft is not None, place)  # the engine as deployed
    episode(engine, pool[:2], 4, 64, 0, 1, 1, 256)  # warm-up
    rows, acc_by_depth = [], {}
    # Grid points in random order, with a training mix and a held-out episode (random mix of
    # every shape per step; the two from different seeds) after every `every`-th point: slow
    # drifts of the machine's load then hit training and held-out rows alike instead of
    # aliasing with one feature, and the fit sees steps whose shapes change from step to
    # step (draft catch-up, partial trees) as the planner's plans make them.
    points = grid(args.grid, draft is not None)
    rng.shuffle(points)
    held_rng = random.Random(args.seed + 1000)
    mix_rng = random.Random(args.seed + 2000)
    every = max(1, len(points) // {"smoke": 1, "quick": 6}.get(args.grid, 32))
    # The sweep's episodes: (kind, run) with kind "grid", "mix" (training) or "held".
    # Random mixes draw their per-step shapes from their own seed (held-out and training
    # mixes from different streams: no held-out episode is ever trained on).
    episodes = []
    for i, (conc, plen, chunk, (depth, width)) in enumerate(points):
        # Prompt lengths spread around plen, as in any served batch: attention runs padded to
        # the longest sequence of a batch (or group), so equal lengths (the sweep before) made
        # the fit ~15-25% too fast on the held-out mixes' unequal batches (every kind).
        prompts = [p[: rng.randint(max(8, plen // 4), min(room, 2 * plen))] for p in rng.sample(pool, conc)]
        episodes.append(("grid", depth if width == 1 else 0, functools.partial(
            episode, engine, prompts, args.new_tokens, chunk, depth, width, 1 + depth * width,
            args.max_batch_tokens)))
        if i % every == every - 1:
            for kind, mrng in (("mix", mix_rng), ("held", held_rng)):
                conc = mrng.choice([1, 3, 6, 12, 24])
                prompts = [p[: mrng.randint(8, room)] for p in mrng.sample(pool, conc)]
                seed = mrng.getrandbits(32)
                episodes.append((kind, 0, lambda prompts=prompts, seed=seed: episode(
                    engine, prompts, args.new_tokens, 0, 0, 1, 1, 0, rng=random.Random(seed))))
    # The whole sweep runs `repeats` times and each iteration keeps the min over its runs:
    # runs minutes apart, not back to back, so a burst of another process's load (seconds)
    # rarely hits every run of one iteration.
    runs: list[list[list[tuple]]] = [[] for _ in episodes]
    for rep in range(max(1, args.repeats)):
        for k, (kind, chain_depth, fn) in enumerate(episodes):
            got, acc = fn()
            runs[k].append(got)
            if rep == 0 and chain_depth:
                acc_by_depth.setdefault(chain_depth, []).extend(acc)
    held, mixes = [], []  # held-out rows; training rows from random mixes (their indices)
    for (kind, _, _), rr in zip(episodes, runs):
        got = combine(rr, args.timing)[1:]  # an episode's first step carries one-off costs
        if kind == "held":
            held += got
        else:
            if kind == "mix":
                mixes += range(len(rows), len(rows) + len(got))
            rows += got
    # Noise between sweeps: the same iteration's CPU time in the first two sweeps.
    col = 6 if wall else 5
    pairs = [(a[col], b[col]) for rr in runs if len(rr) > 1 and len(rr[0]) == len(rr[1])
             for a, b in zip(rr[0][1:], rr[1][1:]) if a[:5] == b[:5]]
    sweep_noise = (round(float(np.median([abs(a - b) / b for a, b in pairs])), 4) if pairs else None)
    # Noise floor: one deterministic episode (fixed shapes, greedy) timed twice, row by row.
    fixed = [p[:64] for p in pool[:8]]
    t1, t2 = (np.array([r[6 if wall else 5] for r in episode(engine, fixed, args.new_tokens, 64, 2, 1, 3, 1024)[0][1:]])
              for _ in range(2))
    n = min(len(t1), len(t2))
    noise = {"median_ape_between_runs": round(float(np.median(np.abs(t1[:n] - t2[:n]) / t2[:n])), 4),
             "mape_between_runs": round(float(np.mean(np.abs(t1[:n] - t2[:n]) / t2[:n])), 4),
             "median_ape_between_sweeps": sweep_noise}
    if args.dump_rows:
        Path(args.dump_rows).write_text(json.dumps({"train": rows, "held_out": held, "train_mix_rows": mixes}))
    fitted = CostModel.fit(seconds(rows, wall))
    err_train, err_held = prediction_error(fitted, seconds(rows, wall)), prediction_error(fitted, seconds(held, wall))
    err_held_wall = prediction_error(fitted, seconds(held, wall=True))  # under this machine's current load
    err_held_online = online_prediction_error(fitted, seconds(held, wall))
    deepest = max(acc_by_depth) if acc_by_depth else 0
    hello = engine.hello()
    name = args.name or Path(args.out).stem
    doc = {
        "name": name,
        "source": (
            f"Measured by `sglang-slo profile --model {args.model}"
            + (f" --draft {args.draft}" if args.draft else "")
            + (f" --device {place.device} --dtype {place.dtype}" if wall else "")
            + f" --grid {args.grid} --repeats {args.repeats}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}:\n"
            + (f"embedded engine on {torch.cuda.get_device_name()} ({place.dtype}, torch {torch.__version__}), "
               f"load average {os.getloadavg()[0]:.1f} at the end.\n"
               f"{len(rows)} engine iterations (wall seconds of Engine.step) over a grid of\n"
               if wall else
               f"embedded engine, {torch.get_num_threads()} torch thread(s), load average {os.getloadavg()[0]:.1f} at the end.\n"
               f"{len(rows)} engine iterations (CPU seconds of Engine.step on its thread, OMP=1) over a grid of\n")
            + "concurrency, prompt length, prefill chunk and draft depth/width, fit by CostModel.fit.\n"
            + ("Wall time includes the GPU's work; the planner's online `scale` absorbs contention.\n" if wall else
               "CPU time is the work's own cost; the planner's online `scale` absorbs contention.\n")
            + f"The sweep ran {args.repeats}x; identical iterations keep the {args.timing} of their times.\n"
            f"Held-out random mixes ({len(held)} iterations): {json.dumps(err_held)}.\n"
            f"The same, predicted one step ahead with the online scale: {json.dumps(err_held_online)}.\n"
            f"Noise (one fixed episode timed twice back to back; the same iterations in two sweeps): {json.dumps(noise)}.\n"
            f"Acceptance: greedy chains of depth {deepest}, per-position conditional rates.\n"),
        "engine": EngineLimits.from_hello(hello).__dict__ | {"depth_tiers": []},
        "cost": {k: (int(v) if k == "knee_tokens" else float(f"{v:.6g}")) for k, v in fitted.coefficients().items()},
    }
    if deepest:
        doc["acceptance"] = {"default": conditional_acceptance(acc_by_depth[deepest], deepest)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    header = f"# Measured {'CUDA' if wall else 'CPU'} profile of the embedded engine (written by `sglang-slo profile`).\n"
    Path(args.out).write_text(header + yaml.safe_dump(doc, sort_keys=False, width=120))
    summary = {"out": args.out, "train": err_train, "held_out": err_held, "held_out_online": err_held_online,
               "held_out_wall_time": err_held_wall,
               "train_by_kind": error_by_kind(fitted, seconds(rows)),
               "held_out_by_kind": error_by_kind(fitted, seconds(held)),
               "noise_floor": noise, "coefficients": doc["cost"],
               "acceptance": doc.get("acceptance", {}), "seconds": round(time.perf_counter() - t_start, 1)}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))
