"""`sglang-slo demo` (run by `make demo`): policies side by side, simulated and served for real.

Simulated scenarios:
  1. mixed multi-SLO traffic (agent loops, reasoning, coding, chat) on an H100 running
     Llama-3.1-8B + EAGLE-3 (configs/hardware/h100-llama3.1-8b-eagle3.yaml);
  2. AdaServe's own evaluation mix on 8x A100 running Llama-3.1-70B + a 1B draft
     (configs/hardware/a100-llama3.1-70b-1b-draft.yaml); TTFT is not targeted there, so the
     AdaServe attainment definition is the meaningful one.
Served scenario (unless --no-serve): the real embedded server (`sglang-slo serve`, tiny pair,
planner sidecar over ZeroMQ) under `fcfs` and `slo_unified`, one short mixed multi-SLO trace
replayed over HTTP, measured per-class attainment beside the simulator's prediction
(eval/demo_serve.py; results/served_demo.{json,md}).
Prints one table per scenario and writes results/demo.json and results/demo.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALL_POLICIES = ("fcfs", "priority", "specserve", "adaserve", "slos_serve", "slo_unified")


@dataclass(frozen=True)
class Scenario:
    name: str
    workload: str
    hardware: str
    rate: float
    """Arrivals per second."""
    duration_s: float
    definition: str
    """Attainment definition that matters for this workload (used by --sweep)."""
    note: str


SCENARIOS = (
    Scenario("mixed-h100", "mixed", "configs/hardware/h100-llama3.1-8b-eagle3.yaml", 22.0, 30.0, "slos_serve",
             "tool-calling loops + reasoning + coding + chat; gamma arrivals (k=0.5)"),
    Scenario("adaserve-a100", "adaserve", "configs/hardware/a100-llama3.1-70b-1b-draft.yaml", 4.0, 60.0, "adaserve",
             "AdaServe 60/20/20 coding/chat/summarization, 256 output tokens, TPOT-only SLOs"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policies", default=",".join(ALL_POLICIES), help="comma-separated policies (unavailable ones are skipped)")
    p.add_argument("--out-dir", default=str(ROOT / "results"), help="where demo.json and demo.md go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a third of the arrival window (smoke run)")
    p.add_argument("--sweep", action="store_true", help="also find each policy's capacity (slow: minutes per policy)")
    p.add_argument("--over-zmq", action="store_true", help="run each planner as a `python -m sidecar` process")
    p.add_argument("--no-serve", action="store_true", help="skip the served comparison on the real embedded server")
    p.add_argument("--served-policies", default="fcfs,slo_unified", help="policies of the served comparison")


def _available(names: list[str]) -> list[str]:
    from sidecar.policies.base import make_policy

    out = []
    for n in names:
        try:
            make_policy(n)
            out.append(n)
        except (ValueError, ImportError) as e:
            print(f"demo: skipping policy {n}: {e}", file=sys.stderr)
    return out


def run(args: argparse.Namespace) -> int:
    from eval.capacity import find_capacity
    from eval.compare import compare, make_workload, unloaded_tpot_s
    from eval.report import markdown_table, text_table
    from sidecar.cost_model import load_profile

    policies = _available([p.strip() for p in args.policies.split(",") if p.strip()])
    if not policies:
        print("demo: no policy available", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    doc = {"policies": policies, "seed": args.seed, "scenarios": {}}
    md = ["# sglang-slo demo: policies side by side (simulated engines)", "",
          "Attainment: SLOs-Serve = admitted, TTFT met and every token by its stage-aware deadline; "
          "AdaServe = mean TPOT within the SLO. Goodput counts SLOs-Serve-meeting requests per second "
          "of the arrival window. Rejected and unfinished requests are misses.", ""]
    for sc in SCENARIOS:
        hw = str(ROOT / sc.hardware)
        duration = sc.duration_s / 3 if args.quick else sc.duration_s
        w = make_workload(sc.workload, hw, rate=sc.rate, duration_s=duration, seed=args.seed)
        t = time.perf_counter()
        results = compare(w, hw, policies, seed=args.seed, over_zmq=args.over_zmq)
        capacity = None
        if args.sweep:
            capacity = {}
            for p in policies:
                c = find_capacity(sc.workload, hw, p, definition=sc.definition, start_rate=sc.rate,
                                  duration_s=duration, seed=args.seed, rel_tol=0.1)
                capacity[p] = {"rate": c.rate, "attainment": c.attainment, "probes": c.probes}
        wall = time.perf_counter() - t
        base = unloaded_tpot_s(load_profile(hw))
        head = (f"{sc.name}: {sc.note}; {len(w.requests)} requests at {sc.rate:g}/s for {duration:g} s; "
                f"unloaded TPOT {base * 1000:.1f} ms; simulated in {wall:.1f} s")
        print(f"\n== {head}")
        print(text_table(results, capacity))
        md += [f"## {sc.name}", "", head, "", markdown_table(results, capacity), ""]
        doc["scenarios"][sc.name] = {"workload": sc.workload, "hardware": sc.hardware, "rate": sc.rate,
                                     "duration_s": duration, "requests": len(w.requests), "unloaded_tpot_s": base,
                                     "results": results, "capacity": capacity, "wall_s": wall}
    if not args.no_serve:
        from eval.demo_serve import run_served_comparison

        served_policies = [p.strip() for p in args.served_policies.split(",") if p.strip()]
        print(f"\n== served: real `sglang-slo serve` (embedded runtime, tiny pair) under {', '.join(served_policies)}")
        try:
            doc["served"] = run_served_comparison(served_policies, out_dir=out_dir, seed=args.seed)
            md += ["## served (real embedded server, CPU tiny pair)", "",
                   "See served_demo.md for the per-class table (measured vs simulated).", ""]
        except (ValueError, RuntimeError, TimeoutError) as e:
            print(f"demo: served comparison failed: {e}", file=sys.stderr)
            doc["served"] = {"error": str(e)}
    doc["wall_s"] = time.perf_counter() - t0
    (out_dir / "demo.json").write_text(json.dumps(doc, indent=1))
    (out_dir / "demo.md").write_text("\n".join(md))
    print(f"\nwrote {out_dir / 'demo.json'} and {out_dir / 'demo.md'} ({doc['wall_s']:.0f} s)")
    return 0
