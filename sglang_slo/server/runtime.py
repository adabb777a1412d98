"""`ServerRuntime`: builds and owns everything `sglang-slo serve` runs, and shuts it down in order.

    rt = ServerRuntime.create(args)   # models, engine, sidecar + handshake, app
    asyncio.run(rt.serve())           # uvicorn until SIGINT/SIGTERM
    rt.shutdown()                     # engine thread, sidecar (idempotent)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from protos.channel import ipc_endpoint
from sglang_slo.engine.device import Placement
from sglang_slo.engine.engine import Engine, EngineConfig
from sglang_slo.engine.loader import load_model
from sglang_slo.engine.planner_link import PlannerLink
from sglang_slo.engine.request import SamplingParams
from sglang_slo.engine.scheduler import SchedulerConfig
from sglang_slo.engine.tokenizer import Tokenizer
from sglang_slo.server.app import ServerContext, build_app
from sglang_slo.server.bridge import EngineBridge
from sglang_slo.server.embedded import EmbeddedDriver
from sglang_slo.server.metrics import ServerMetrics
from sglang_slo.server.sidecar_proc import SidecarSupervisor
from sglang_slo.slo import SloCatalog

log = logging.getLogger("sglang_slo.server")


@dataclass
class ServerRuntime:
    args: argparse.Namespace
    ctx: ServerContext
    bridge: EngineBridge
    supervisor: SidecarSupervisor | None
    link: PlannerLink | None
    _down: bool = False

    @classmethod
    def create(cls, args: argparse.Namespace) -> ServerRuntime:
        from sglang_slo.server.launch import default_hardware

        model_dir = Path(args.model)
        tokenizer = Tokenizer.load(model_dir)
        where = Placement.from_args(args)
        target = load_model(model_dir, dtype=where.torch_dtype, device=where.device)
        draft = load_model(args.draft, dtype=where.torch_dtype, device=where.device) if args.draft else None
        # A request arriving mid-plan prefills at once within the plan's arrival allowance
        # instead of waiting two or more iterations for a plan that lists it.
        sched = SchedulerConfig(max_batch_tokens=args.max_batch_tokens, max_running=args.max_running,
                                honour_arrival_tokens=True)
        engine = Engine(target, draft, EngineConfig(kv_capacity_tokens=args.kv_capacity_tokens, scheduler=sched,
                                                    device=where.device, dtype=where.dtype))
        catalog = SloCatalog.load(args.slo_classes, args.unloaded_tpot_ms / 1000.0 if args.unloaded_tpot_ms else None,
                                  default=args.default_slo_class)
        metrics = ServerMetrics()
        driver = EmbeddedDriver(engine, metrics)
        bridge = EngineBridge(driver, metrics, max_in_flight=args.max_in_flight)
        supervisor = link = None
        if not args.no_sidecar:
            endpoint = ipc_endpoint("planner")
            # the supervisor tells us about restarts; no silence heuristic (an idle engine gets no plans)
            link = PlannerLink(engine, endpoint, silent_after_s=float("inf"))

            def restarted(n: int) -> None:  # monitor thread
                metrics.sidecar_restarts.inc()
                bridge.call_on_engine_thread(link.restart)

            extra = [a for kv in args.sidecar_set for a in ("--set", kv)]
            supervisor = SidecarSupervisor(endpoint, args.policy, args.hardware or default_hardware(), extra,
                                           on_restart=restarted, log_path=args.sidecar_log)
            supervisor.start()
            if not link.wait_welcome(args.handshake_timeout_s):
                supervisor.stop()
                link.close()
                why = link.refused or f"no PlannerWelcome within {args.handshake_timeout_s:.0f}s"
                raise RuntimeError(f"planner sidecar handshake failed: {why}")
            log.info("planner sidecar (pid %s) welcomed the engine: policy %s", supervisor.pid, link.policy)
            driver.link = link

        def debug_state() -> dict:
            return {
                "kv_free_tokens": engine.tables.free_tokens,
                "kv_capacity_tokens": engine.tables.target.capacity_tokens,
                "engine_requests": len(engine.requests),
                "sidecar_pid": supervisor.pid if supervisor else None,
                "sidecar_restarts": supervisor.restarts if supervisor else 0,
                "planner_welcomed": bool(link and link.welcomed),
                "planner_handshakes": link.handshakes if link else 0,
                "plans_received": link.plans_received if link else 0,
                "stuck_resyncs": driver.stuck_resyncs,
                "policy": args.policy if link else "fallback",
                # SGLang's /server_info shape: bench_serving reports this as "Accept length"
                "internal_states": [{"avg_spec_accept_length": driver.avg_accept_length}],
            }

        ctx = ServerContext(
            tokenizer=tokenizer, bridge=bridge, catalog=catalog, metrics=metrics,
            model_name=args.model_name or model_dir.name, model_path=str(model_dir),
            max_context=engine.max_context, api_key=args.api_key, make_params=SamplingParams,
            debug_state=debug_state,
        )
        return cls(args, ctx, bridge, supervisor, link)

    async def serve(self) -> int:
        app = build_app(self.ctx)
        self.bridge.start(asyncio.get_running_loop())
        config = uvicorn.Config(app, host=self.args.host, port=self.args.port, log_level="warning",
                                timeout_graceful_shutdown=3, access_log=False)
        server = uvicorn.Server(config)
        print(f"sglang-slo: serving {self.ctx.model_name} on http://{self.args.host}:{self.args.port} "
              f"(policy {self.args.policy if self.link else 'fallback only'})", flush=True)
        await server.serve()
        return 0

    def shutdown(self) -> None:
        """Stop the engine thread, then the sidecar (idempotent)."""
        if self._down:
            return
        self._down = True
        self.bridge.stop()
        if self.supervisor:
            self.supervisor.stop()
        log.info("sglang-slo: stopped")
