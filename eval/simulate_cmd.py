"""`sglang-slo simulate`: policies side by side on a simulated engine (attainment, goodput, capacity)."""

from __future__ import annotations

import argparse
import json
import sys
import time

DEFAULT_HARDWARE = "configs/hardware/h100-llama3.1-8b-eagle3.yaml"
ALL_POLICIES = "fcfs,fcfs_mixed,priority,specserve,adaserve,slos_serve,slo_unified"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", default="mixed", help="workload name (configs/workloads/NAME.yaml) or YAML path")
    p.add_argument("--hardware", default=DEFAULT_HARDWARE, help="hardware profile YAML")
    p.add_argument("--policies", default=ALL_POLICIES, help="comma-separated planner policies")
    p.add_argument("--rate", type=float, default=None, help="arrivals/s (default: the workload's)")
    p.add_argument("--sweep", action="store_true", help="also find each policy's capacity (bisection over rate)")
    p.add_argument("--target", type=float, default=0.9, help="attainment target of --sweep (default 0.9)")
    p.add_argument("--definition", default="slos_serve", choices=["slos_serve", "adaserve"],
                   help="attainment definition used by --sweep")
    p.add_argument("--sweep-seeds", type=int, default=1, help="--sweep: average attainment over this many seeds")
    p.add_argument("--duration", type=float, default=None, help="arrival window, seconds (default: the workload's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-context", type=int, default=None, help="longest request in tokens (default: from the profile)")
    p.add_argument("--scale-slos", action="store_true",
                   help="rescale SLO classes by the profile's unloaded TPOT (CPU tiny-model profiles)")
    p.add_argument("--save-workload", default=None, help="write the generated workload as JSON")
    p.add_argument("--over-zmq", action="store_true", help="run each planner as a `python -m sidecar` process over ipc://")
    p.add_argument("--no-mixed-forward", action="store_true",
                   help="engine cannot mix prefill and decode in one forward (SGLang's default, no --enable-mixed-chunk)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="policy config override for every policy (VALUE parsed as YAML), repeatable")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--out", default=None, help="also write the JSON to this file")


def run(args: argparse.Namespace) -> int:
    from eval.capacity import find_capacity
    from eval.compare import compare, make_workload
    from eval.report import text_table
    from eval.simulator import SimConfig
    from eval.workloads import save_workload
    from sidecar.policies.base import policy_names

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in policy_names()]
    if not policies or unknown:
        print(f"simulate: unknown policies {unknown}; known: {', '.join(policy_names())}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        overrides = _overrides(args.overrides)
        config = SimConfig(mixed_forward=not args.no_mixed_forward)
        w = make_workload(args.workload, args.hardware, rate=args.rate, duration_s=args.duration, seed=args.seed,
                          max_context=args.max_context, scale_slos=args.scale_slos)
        if args.save_workload:
            save_workload(w, args.save_workload)
        results = compare(w, args.hardware, policies, seed=args.seed, over_zmq=args.over_zmq, config=config,
                          policy_overrides=overrides)
        capacity = None
        if args.sweep:
            capacity = {}
            for p in policies:
                c = find_capacity(args.workload, args.hardware, p, target=args.target, definition=args.definition,
                                  start_rate=w.rate, duration_s=w.duration_s, seed=args.seed,
                                  max_context=args.max_context, scale_slos=args.scale_slos,
                                  policy_overrides=overrides, seeds=args.sweep_seeds, config=config)
                capacity[p] = {"rate": c.rate, "attainment": c.attainment, "probes": c.probes}
    except (ValueError, TypeError, RuntimeError) as e:
        print(f"simulate: {e}", file=sys.stderr)
        return 2
    doc = {"workload": w.name, "hardware": args.hardware, "rate": w.rate, "duration_s": w.duration_s,
           "seed": args.seed, "requests": len(w.requests), "over_zmq": args.over_zmq,
           "mixed_forward": config.mixed_forward, "results": results,
           "capacity": capacity, "target": args.target, "definition": args.definition,
           "wall_s": time.perf_counter() - t0}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(f"workload {w.name}: {len(w.requests)} requests, {w.rate:g} arrivals/s for {w.duration_s:g} s, "
              f"hardware {args.hardware}, seed {args.seed}")
        print(text_table(results, capacity))
    return 0


def _overrides(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out
