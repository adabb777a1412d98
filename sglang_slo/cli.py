"""`sglang-slo <subcommand>`: one entry point; each subcommand lives in its own module.

A subcommand module provides `add_arguments(parser)` and `run(args) -> int`. Modules are
imported only when their subcommand runs, so `sglang-slo simulate` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("eval.simulate_cmd", "run policies on a simulated engine and print SLO attainment"),
    "bench-planner": ("sidecar.bench", "plan latency per policy and ZMQ round trip (JSON)"),
    "train-tiny": ("sglang_slo.engine.train_tiny", "train the tiny target/draft pair (HF Llama format)"),
    "bench-engine": ("sglang_slo.engine.bench", "embedded runtime throughput with/without speculation (JSON)"),
    "profile": ("sglang_slo.engine.profile", "measure iteration times and write a hardware profile YAML"),
    "serve": ("sglang_slo.server.launch", "start the engine + HTTP server and the planner sidecar "
              "(--backend embedded, default; --backend sglang: SGLang 0.5.23 with the plugin)"),
    "demo": ("eval.demo", "the main job: compare policies side by side and write a report"),
    "demo-serve": ("eval.demo_serve", "real servers per policy on one multi-SLO trace vs the simulator"),
}

# `serve --backend X` picks the launcher module; the embedded runtime is the default.
SERVE_BACKENDS = {"embedded": "sglang_slo.server.launch", "sglang": "sglang_slo.sglang_plugin.launch"}


def _module_for(name: str, rest: list[str]) -> str:
    if name == "serve":
        for i, arg in enumerate(rest):
            if arg == "--":
                break
            backend = arg.split("=", 1)[1] if arg.startswith("--backend=") else (
                rest[i + 1] if arg == "--backend" and i + 1 < len(rest) else None)
            if backend is not None:
                if backend not in SERVE_BACKENDS:
                    raise SystemExit(f"sglang-slo serve: unknown --backend {backend!r} "
                                     f"(choose from {', '.join(SERVE_BACKENDS)})")
                return SERVE_BACKENDS[backend]
    return SUBCOMMANDS[name][0]


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sglang-slo", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", metavar="SUBCOMMAND")
    for name, (_, help_) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SUBCOMMANDS:
        _top_parser().parse_args(argv or ["--help"])
        return 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(_module_for(name, rest))
    parser = argparse.ArgumentParser(prog=f"sglang-slo {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(rest)) or 0)


if __name__ == "__main__":
    sys.exit(main())
