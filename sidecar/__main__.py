"""`python -m sidecar --endpoint ipc://... --policy NAME --hardware configs/hardware/X.yaml`"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import yaml

from sidecar.planner import Planner
from sidecar.policies.base import policy_names
from sidecar.proc import PlannerProc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sidecar", description="SLO planner sidecar (ZMQ ROUTER)")
    p.add_argument("--endpoint", required=True, help="ZMQ endpoint to bind, e.g. ipc:///tmp/planner.sock or tcp://127.0.0.1:5555")
    p.add_argument("--policy", default="fcfs", help=f"policy name: {', '.join(policy_names())}")
    p.add_argument("--hardware", required=True, help="hardware profile YAML (configs/hardware/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="policy config override (VALUE parsed as YAML), repeatable")
    p.add_argument("--busy-poll", action="store_true",
                   help="poll the socket without sleeping (as SGLang's scheduler loop does): lowest "
                        "report->plan latency, costs one CPU core; default: block in the kernel")
    p.add_argument("--horizon-iters", type=float, default=None, metavar="N",
                   help="plans stay valid for N predicted iterations, fixed (default: 4, extended to "
                        "the measured plan lag, up to --max-horizon-ms, for a real engine)")
    p.add_argument("--max-horizon-ms", type=float, default=50.0,
                   help="cap on the lag-adaptive plan validity (ms; default 50)")
    p.add_argument("--steady-skips", type=int, default=2, metavar="N",
                   help="in steady decode (nothing waiting or new), answer only every (N+1)-th report of a "
                        "real engine with a new plan (the one in force still holds); 0 = plan after every report")
    p.add_argument("--nice", type=int, default=0, metavar="N",
                   help="lower this process's CPU priority by N (os.nice), for a planner sharing a few cores "
                        "with the engine (measured worse on the 2-core CPU test box: see the plugin README)")
    p.add_argument("--cpus", default="", metavar="LIST",
                   help="pin this process (and its ZMQ I/O thread) to these CPUs, e.g. 1 or 2,3 (os.sched_setaffinity); "
                        "keeps the planner off the engine's core (default: no pinning)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p.parse_args(argv)


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def pin_to(cpus: str) -> None:
    """Pin this process to the comma-separated CPU list `cpus` (ValueError if it cannot be)."""
    try:
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
    except (ValueError, OSError) as e:
        raise ValueError(f"--cpus {cpus!r}: {getattr(e, 'strerror', None) or e} "
                         f"(CPUs this process may use: {sorted(os.sched_getaffinity(0))})") from e


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        planner = Planner.create(args.policy, args.hardware, **parse_overrides(args.overrides))
        if args.horizon_iters is not None and args.horizon_iters <= 0 or args.max_horizon_ms <= 0:
            raise ValueError("--horizon-iters and --max-horizon-ms must be > 0")
        if args.steady_skips < 0:
            raise ValueError("--steady-skips must be >= 0")
        if args.cpus:  # before PlannerProc: the ZMQ context's I/O thread inherits the mask
            pin_to(args.cpus)
    except (ValueError, TypeError) as e:
        print(f"sidecar: {e}", file=sys.stderr)
        return 2
    if args.nice > 0:
        os.nice(args.nice)
    if args.horizon_iters is not None:
        planner.horizon_iters = args.horizon_iters
    planner.max_horizon_s = args.max_horizon_ms / 1e3
    proc = PlannerProc(args.endpoint, planner, args.policy, busy_poll=args.busy_poll,
                       adapt_horizon=args.horizon_iters is None, steady_skips=args.steady_skips)
    proc.install_signal_handlers()
    print(f"sidecar: {args.policy} on {planner.profile.name} listening at {proc.endpoint}", flush=True)
    return proc.run()


if __name__ == "__main__":
    sys.exit(main())
