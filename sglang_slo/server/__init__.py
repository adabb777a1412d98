"""HTTP serving: `sglang-slo serve` (launch.py) -> runtime.py builds engine, sidecar, bridge, app.

    app.py          FastAPI handlers (OpenAI completions/chat, /generate, metrics, health)
    bridge.py       engine thread <-> asyncio handoff, per-request records, stage markers
    embedded.py     the embedded Engine + PlannerLink as the bridge's `Driver`
    sidecar_proc.py supervised planner sidecar child process (restart on death)
    detokenize.py   incremental detokenization with stop strings
    schemas.py      request bodies; errors.py OpenAI error format; metrics.py Prometheus
"""
