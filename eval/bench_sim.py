"""`python -m eval.bench_sim`: simulator speed (JSON). How long a ~300-request run takes per
policy, in-process and with the planner as a real sidecar process over ipc://."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
H100 = str(ROOT / "configs/hardware/h100-llama3.1-8b-eagle3.yaml")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.bench_sim", description=__doc__.splitlines()[0])
    p.add_argument("--policies", default="fcfs,slo_unified")
    p.add_argument("--workload", default="mixed")
    p.add_argument("--hardware", default=H100)
    p.add_argument("--rate", type=float, default=10.0)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--no-zmq", action="store_true", help="skip the over-ZMQ runs")
    args = p.parse_args(argv)

    from eval.compare import make_workload
    from eval.simulator import simulate

    w = make_workload(args.workload, args.hardware, rate=args.rate, duration_s=args.duration)
    out = {"workload": args.workload, "requests": len(w.requests), "rate": args.rate,
           "duration_s": args.duration, "runs": []}
    for policy in args.policies.split(","):
        for over_zmq in (False,) if args.no_zmq else (False, True):
            t = time.perf_counter()
            res = simulate(w, args.hardware, policy, over_zmq=over_zmq)
            wall = time.perf_counter() - t
            st = res.stats
            out["runs"].append({
                "policy": policy, "over_zmq": over_zmq, "wall_s": round(wall, 3),
                "iterations": st["iterations"], "iterations_per_s": round(st["iterations"] / wall, 1),
                "simulated_s": round(res.elapsed_s, 2), "sim_speedup": round(res.elapsed_s / wall, 2),
                "plan_latency_s_total": round(st["plan_latency_s_total"], 3)})
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
