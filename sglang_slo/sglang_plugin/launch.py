"""`sglang-slo serve --backend sglang --model DIR --policy NAME [SGLang args...]`

Starts the planner sidecar (supervised: restarted if it dies) and SGLang's own HTTP server
(`python -m sglang.launch_server`) with this project's plugin loaded by entry point, wired
together by `$SGLANG_SLO_PLANNER`. Arguments after the known ones go to SGLang verbatim.

GPU (one H100, Llama-3.1-8B-Instruct + an EAGLE-3 draft, per-batch depth from the plan):

    sglang-slo serve --backend sglang --model meta-llama/Llama-3.1-8B-Instruct \\
      --policy slo_unified --hardware configs/hardware/h100-llama3.1-8b-eagle3.yaml \\
      --spec-tiers 0,1,2,3,5 -- \\
      --speculative-algorithm EAGLE3 \\
      --speculative-draft-model-path jamesliu1/sglang-EAGLE3-Llama-3.1-Instruct-8B \\
      --speculative-eagle-topk 1 --speculative-num-steps 3 \\
      --enable-priority-scheduling --retraction-policy priority --port 30000

(`--spec-tiers` writes the `--speculative-adaptive-config` file and adds
`--speculative-adaptive`; every tier is captured once at start-up.)

CPU (tests; no speculation): `--cpu` adds SGLang's CPU flags; the process environment must
provide sgl_kernel's two CPU ops (`make sglang-cpu-serve` puts the test shim on PYTHONPATH and
sets SGLANG_USE_CPU_ENGINE=1).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile

from protos.channel import ipc_endpoint

from sglang_slo.sglang_plugin.entry_point import ensure_entry_point
from sglang_slo.sglang_plugin.scheduler_state import EDF_ENV, PLANNER_ENV

log = logging.getLogger(__name__)

CPU_FLAGS = [
    "--device", "cpu", "--attention-backend", "torch_native", "--skip-server-warmup",
    "--cuda-graph-backend-decode", "disabled", "--cuda-graph-backend-prefill", "disabled",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="sglang", choices=["sglang"], help="serving engine (this launcher: sglang)")
    p.add_argument("--model", required=True, help="model directory or hub id (SGLang --model-path)")
    p.add_argument("--policy", default="slo_unified", help="planner policy name (sidecar --policy)")
    p.add_argument("--hardware", default=None, help="hardware profile YAML for the planner's cost model")
    p.add_argument("--planner-endpoint", default=None,
                   help="use an already running planner at this ZMQ endpoint instead of starting one")
    p.add_argument("--planner-set", action="append", default=[], metavar="KEY=VALUE",
                   help="policy config override passed to the sidecar (--set), repeatable")
    p.add_argument("--planner-horizon-iters", type=float, default=None, metavar="N",
                   help="plans stay valid for N predicted iterations (sidecar --horizon-iters; default: "
                        "adapted to the measured plan lag)")
    p.add_argument("--planner-nice", type=int, default=0, metavar="N",
                   help="run the sidecar N nice levels below the engine (sidecar --nice; default 0: 10 measured "
                        "worse on a 2-core CPU box)")
    p.add_argument("--no-planner", action="store_true",
                   help="start no planner: the plugin attaches SLOs but SGLang schedules on its own")
    p.add_argument("--edf-fallback", action="store_true",
                   help="without a fresh plan, order the waiting queue by deadline (default: SGLang's order)")
    p.add_argument("--spec-tiers", default="",
                   help="comma-separated speculation depths to pre-capture (adds --speculative-adaptive)")
    p.add_argument("--cpu", action="store_true", help="add SGLang's CPU flags (torch_native attention, no graphs)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--sidecar-log", default=None, help="append the sidecar's output to this file")
    p.add_argument("sglang_args", nargs=argparse.REMAINDER, help="arguments passed to SGLang's launch_server")


def sglang_command(args: argparse.Namespace, tiers_path: str | None = None) -> list[str]:
    """The `python -m sglang.launch_server ...` command line for `args`."""
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", args.model,
           "--host", args.host, "--port", str(args.port)]
    if args.cpu:
        cmd += CPU_FLAGS
    if tiers_path:
        cmd += ["--speculative-adaptive", "--speculative-adaptive-config", tiers_path]
    extra = list(args.sglang_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    return cmd + extra


def parse_tiers(text: str) -> list[int]:
    """'0,1,3' -> [0, 1, 3]; ValueError naming --spec-tiers on anything else."""
    try:
        tiers = [int(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"--spec-tiers needs comma-separated non-negative depths, got {text!r}") from None
    return tiers


def write_tier_config(tiers: list[int], directory: str) -> str:
    """SGLang adaptive-spec config offering exactly `tiers` at every batch size."""
    if not tiers or any(t < 0 for t in tiers):
        raise ValueError(f"--spec-tiers needs non-negative depths, got {tiers}")
    path = os.path.join(directory, "spec-tiers.json")
    with open(path, "w") as f:
        json.dump({"1": {"candidate_steps": sorted(set(tiers))}}, f)
    return path


def _check_cpu_environment() -> str:
    if importlib.util.find_spec("sgl_kernel") is None:
        return ("SGLang on CPU imports sgl_kernel's CPU ops, which are not installed; for tests put "
                "tests/sglang_support/sgl_kernel_shim on PYTHONPATH and set SGLANG_USE_CPU_ENGINE=1 "
                "(`make sglang-cpu-serve` does both)")
    if os.environ.get("SGLANG_USE_CPU_ENGINE") != "1":
        return "SGLang on CPU needs SGLANG_USE_CPU_ENGINE=1 in the environment"
    return ""


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from sglang_slo.sglang_plugin.targets import check_targets

    try:
        check_targets()  # the same check the plugin runs in every SGLang process
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    if args.cpu and (problem := _check_cpu_environment()):
        print(f"sglang-slo serve: {problem}", file=sys.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="sglang-slo-serve-")
    tiers_path = None
    if args.spec_tiers:
        try:
            tiers_path = write_tier_config(parse_tiers(args.spec_tiers), workdir)
        except ValueError as e:
            print(f"sglang-slo serve: {e}", file=sys.stderr)
            return 2

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    entry_dir = ensure_entry_point()
    if entry_dir:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (entry_dir, env.get("PYTHONPATH", "")) if p)
    if args.edf_fallback:
        env[EDF_ENV] = "1"

    supervisor = None
    if not args.no_planner:
        endpoint = args.planner_endpoint or ipc_endpoint("planner")
        env[PLANNER_ENV] = endpoint
        if not args.planner_endpoint:
            from sglang_slo.server.sidecar_proc import SidecarSupervisor

            if not args.hardware:
                print("sglang-slo serve: --hardware PROFILE.yaml is required to start the planner", file=sys.stderr)
                return 2
            extra = [a for kv in args.planner_set for a in ("--set", kv)]
            if args.planner_horizon_iters is not None:
                extra += ["--horizon-iters", str(args.planner_horizon_iters)]
            if args.planner_nice > 0:
                extra += ["--nice", str(args.planner_nice)]
            supervisor = SidecarSupervisor(endpoint, args.policy, args.hardware, extra_args=extra,
                                           log_path=args.sidecar_log)
            supervisor.start()

    server = subprocess.Popen(sglang_command(args, tiers_path), env=env)
    stop = lambda *_: server.send_signal(signal.SIGTERM)  # noqa: E731 -- forward Ctrl-C / SIGTERM
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        return server.wait()
    finally:
        if supervisor is not None:
            supervisor.stop()


def main(argv: list[str] | None = None) -> int:
    """`python -m sglang_slo.sglang_plugin.launch ...` (same arguments as `sglang-slo serve`)."""
    parser = argparse.ArgumentParser(prog="sglang-slo serve --backend sglang", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
