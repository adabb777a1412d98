"""`sglang-slo serve`: the engine + HTTP server process, with the planner sidecar as a child.

    sglang-slo serve --model DIR [--draft DIR] --policy slo_unified --hardware configs/hardware/X.yaml

Start-up: load tokenizer and models -> start the sidecar (`python -m sidecar`) on a fresh
pid-suffixed `ipc://` endpoint -> handshake (EngineHello / PlannerWelcome) -> serve HTTP with
uvicorn. SIGINT / SIGTERM: uvicorn drains, then the engine thread and the sidecar stop. If the
sidecar dies the engine keeps serving on its fallback policy, the supervisor restarts the
sidecar and the link handshakes again and sends a Resync.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from sglang_slo.engine.device import add_device_arguments

log = logging.getLogger("sglang_slo.server")

_REPO = Path(__file__).resolve().parents[2]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="embedded", choices=["embedded"],
                   help="serving engine (this launcher: the embedded runtime; `sglang` routes to the plugin)")
    p.add_argument("--model", required=True, help="target model directory (HF Llama: config.json, "
                   "model.safetensors, tokenizer.json)")
    p.add_argument("--draft", default=None, help="draft model directory (enables speculative decoding)")
    p.add_argument("--policy", default="slo_unified", help="planner policy (fcfs, priority, specserve, "
                   "adaserve, slos_serve, slo_unified)")
    p.add_argument("--hardware", default=None, help="hardware profile YAML for the planner's cost model "
                   "(default: the first configs/hardware/cpu*.yaml, else any profile there)")
    p.add_argument("--slo-classes", default=str(_REPO / "configs" / "slo_classes.yaml"),
                   help="SLO class file (named classes for custom_params.slo.class / x-slo-class)")
    p.add_argument("--unloaded-tpot-ms", type=float, default=None,
                   help="rescale every SLO class for an engine with this unloaded TPOT (CPU tiny model)")
    p.add_argument("--default-slo-class", default="chat", help="class of requests without any SLO annotation")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (not for /health, /metrics)")
    p.add_argument("--model-name", default=None, help="model id in /v1/models (default: the directory name)")
    p.add_argument("--kv-capacity-tokens", type=int, default=65536, help="KV cache slots (tokens)")
    p.add_argument("--max-batch-tokens", type=int, default=2048, help="most tokens per forward")
    p.add_argument("--max-running", type=int, default=64, help="most requests holding KV at once")
    p.add_argument("--max-in-flight", type=int, default=512,
                   help="bounded request queue: more concurrent requests get HTTP 429")
    p.add_argument("--no-sidecar", action="store_true", help="run without a planner (fallback policy only)")
    p.add_argument("--sidecar-log", default=None, help="append the sidecar's output to this file")
    p.add_argument("--sidecar-set", action="append", default=[], metavar="KEY=VALUE",
                   help="policy config override passed to the sidecar (--set), repeatable")
    p.add_argument("--handshake-timeout-s", type=float, default=60.0)
    add_device_arguments(p)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def default_hardware() -> str:
    hw = sorted((_REPO / "configs" / "hardware").glob("cpu*.yaml")) or sorted((_REPO / "configs" / "hardware").glob("*.yaml"))
    if not hw:
        raise SystemExit("no hardware profile found in configs/hardware; pass --hardware")
    return str(hw[0])


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from sglang_slo.server.runtime import ServerRuntime

    try:
        rt = ServerRuntime.create(args)
    except (ValueError, FileNotFoundError, RuntimeError, TimeoutError) as e:
        print(f"sglang-slo serve: {e}", file=sys.stderr)
        return 2
    # uvicorn handles SIGINT/SIGTERM while serving, then restores the previous handlers and
    # re-raises the signal; with these no-op handlers that re-raise no longer kills us before
    # the engine thread and the sidecar are stopped in order.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        return asyncio.run(rt.serve())
    finally:
        rt.shutdown()
