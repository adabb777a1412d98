"""Served comparison: the real `sglang-slo serve` under each policy, one mixed multi-SLO trace.

    from eval.demo_serve import run_served_comparison
    doc = run_served_comparison(policies=("fcfs", "slo_unified"))   # ~1 min per policy on 2 cores

    python -m eval.demo_serve --policies fcfs,slo_unified --out-dir results

Steps: start the server without the draft (no speculation) and measure the target's unloaded
TPOT with a few sequential warm-up requests; draw the trace (tool-calling agent loops, reasoning think/answer,
coding, chat; lengths in tiny-model tokens, within its 256-token context) with every SLO
scaled to m x that TPOT (configs/slo_classes.yaml `cpu_*_multiplier`, reference §2.4); then
per policy: a fresh server subprocess on a free loopback port, replay the SAME trace over
HTTP streaming (eval.replay), compute attainment with eval.metrics, and run the simulator
(eval.simulator) on the same trace with the CPU hardware profile to print its prediction
beside the measurement. Writes results/served_demo.json and results/served_demo.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import msgspec

from eval.load_client import CallResult, ClientConfig, send_request
from eval.metrics import Outcome, summarize
from eval.prompt_text import PromptTexts
from eval.replay import ReplayConfig, ReplayResult, replay_sync
from eval.server_process import ServerProcess
from eval.slo_classes import load_slo_classes, scale_for_unloaded_tpot
from eval.workloads import FULL_SCALE_CONTEXT, GenRequest, Workload, WorkloadSpec, generate
from sglang_slo.engine.device import add_device_arguments

ROOT = Path(__file__).resolve().parent.parent
CPU_PROFILE = ROOT / "configs" / "hardware" / "cpu-tiny.yaml"
DEFAULT_MODEL_DIR = ROOT / "models" / "tiny-demo"  # trained here (quick settings) if no pair is committed
QUICK_TRAIN = {"target_steps": 60, "draft_steps": 40, "max_corpus_bytes": 3_000_000}  # ~minutes on 2 cores
TINY_CONTEXT = 256  # tokens: the tiny pair's max_position_embeddings
CALIBRATION_POLICY = "fcfs"  # the unloaded TPOT is measured on this policy's server, without the draft


# Mixed multi-SLO traffic in tiny-model tokens (every request fits the 256-token context).
DEMO_SPEC = {
    "name": "served-mixed",
    "description": "agent loops + reasoning + coding + chat, sized for the tiny CPU model",
    "arrival": {"process": "gamma", "burstiness": 0.5},
    "classes": [
        {"kind": "tool_calling", "weight": 0.25, "acceptance": "eagle3_strong",
         "system_prompt": {"dist": "uniform", "low": 32, "high": 48},
         "user_prompt": {"dist": "uniform", "low": 8, "high": 24},
         "tool_result": {"dist": "uniform", "low": 8, "high": 24},
         "call_output": {"dist": "uniform", "low": 8, "high": 16},
         "final_output": {"dist": "uniform", "low": 24, "high": 40},
         "continue_p": 0.5, "max_calls": 3,
         "tool_delay_s": {"mu": math.log(0.3), "sigma": 1.0, "min": 0.05, "max": 3.0}},
        {"kind": "reasoning", "weight": 0.15, "acceptance": "reasoning_t1",
         "prompt": {"dist": "uniform", "low": 16, "high": 40},
         "think": {"dist": "uniform", "low": 48, "high": 96},
         "answer": {"dist": "uniform", "low": 16, "high": 48}},
        {"kind": "single", "slo_class": "coding", "weight": 0.3, "acceptance": "eagle3_strong",
         "prompt": {"dist": "uniform", "low": 24, "high": 64},
         "output": {"dist": "uniform", "low": 24, "high": 64}},
        {"kind": "single", "slo_class": "chat", "weight": 0.3, "acceptance": "eagle2_chat",
         "prompt": {"dist": "uniform", "low": 16, "high": 96},
         "output": {"dist": "uniform", "low": 16, "high": 64}},
    ],
}


def demo_trace(unloaded_tpot_s: float, *, rate: float = 1.6, duration_s: float = 40.0, seed: int = 0,
               spec: dict | None = None) -> Workload:
    """The served demo's trace: SLO classes scaled to `unloaded_tpot_s` (seconds), lengths in
    tiny-model tokens; raises ValueError if a request would not fit the tiny context."""
    ws = msgspec.convert(spec or DEMO_SPEC, WorkloadSpec)
    classes = scale_for_unloaded_tpot(load_slo_classes(), unloaded_tpot_s)
    w = generate(ws, rate=rate, duration_s=duration_s, seed=seed, max_context_tokens=FULL_SCALE_CONTEXT,
                 unloaded_tpot_s=unloaded_tpot_s, slo_classes=classes)  # scale 1: lengths as given
    for g in w.requests:
        if g.prompt_tokens + g.output_tokens > TINY_CONTEXT:
            raise ValueError(f"{g.rid}: {g.prompt_tokens} + {g.output_tokens} tokens exceed the "
                             f"{TINY_CONTEXT}-token context")
    return w


# ---- the server subprocess ---------------------------------------------------------------------


# ---- calibration -------------------------------------------------------------------------------


def measure_unloaded_tpot(base_url: str, prompts: PromptTexts, *, requests: int = 6, prompt_tokens: int = 32,
                          output_tokens: int = 48) -> float:
    """Fastest TPOT of `requests` sequential requests on an idle server, seconds (the first is a
    warm-up). The fastest, not the median: other load only slows a request down, and a fresh
    clone's first server once measured 10.4 ms for three of four requests where it serves at
    ~3 ms (SLOs 3x too loose: every policy met all of them)."""
    import asyncio

    from protos.messages import Slo

    async def one(i: int) -> CallResult:
        g = GenRequest(rid=f"warmup-{i}", arrival_s=0.0, prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                       slo=Slo(ttft_s=60.0, tpot_s=10.0, slo_class=""), alphas=[])
        t0 = time.monotonic()
        call = CallResult.new(g, arrival_s=0.0)
        async with httpx.AsyncClient() as http:
            await send_request(http, ClientConfig(base_url=base_url, explicit_slo=True), g,
                               prompts.fresh(prompt_tokens, g.rid), call, lambda: time.monotonic() - t0)
        return call

    tpots = []
    for i in range(requests + 1):
        call = asyncio.run(one(i))
        if call.record.outcome is not Outcome.FINISHED:
            raise RuntimeError(f"warm-up request failed: HTTP {call.status} {call.error}")
        if i > 0 and call.record.tpot_s is not None:
            tpots.append(call.record.tpot_s)
    if not tpots:
        raise RuntimeError("warm-up requests produced no TPOT")
    return min(tpots)


def calibrate(model: Path, prompts: PromptTexts, log_path: Path, hardware: Path | None = None,
              server_args: tuple[str, ...] = ()) -> float:
    """Unloaded TPOT of the target alone (server without the draft, `CALIBRATION_POLICY`), seconds.

    The baseline of the CPU SLO scaling (reference §2.4; AdaServe's per-token baseline is
    non-speculative): the same for every policy, independent of how much any policy speculates."""
    with ServerProcess.for_pair(model, CALIBRATION_POLICY, log_path, hardware=hardware, speculation=False,
                                extra_args=server_args) as srv:
        return measure_unloaded_tpot(srv.url, prompts)


# ---- the comparison ----------------------------------------------------------------------------


@dataclass
class PolicyRun:
    policy: str
    measured: dict
    """eval.metrics.summarize of the replay (goodput per second of the arrival window)."""
    simulated: dict | None
    """eval.metrics.summarize of the simulator on the CPU profile (None: no profile)."""
    replay_stats: dict = field(default_factory=dict)
    elapsed_s: float = 0.0
    """Replay wall time, seconds."""
    startup_s: float = 0.0
    """Server start-up until /health answered, seconds."""
    unloaded_tpot_s: float = 0.0
    """This server's own warm-up TPOT, seconds (the trace's SLOs use the first server's)."""
    error: str = ""
    """Why this policy has no results ('' = it ran)."""


def _simulate(w: Workload, hardware: Path, policy: str) -> dict:
    from eval.simulator import SimConfig, simulate

    res = simulate(w, hardware, policy, config=SimConfig(max_running=64))
    s = summarize(res.records, res.window_s or res.elapsed_s)
    s["elapsed_s"] = res.elapsed_s
    return s


def _pct(x) -> str:
    return "-" if x is None else f"{x:.0%}"


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def side_by_side(runs: list[PolicyRun]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per policy and class, measured vs simulated attainment and latencies."""
    header = ["policy", "class", "reqs", "served SLOs-Serve", "sim SLOs-Serve", "served AdaServe",
              "sim AdaServe", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms", "rejected", "failed",
              "unfinished"]
    rows = []
    for r in runs:
        groups = [("all", r.measured["overall"])] + list(r.measured["classes"].items())
        for cls, g in groups:
            sim = None
            if r.simulated is not None:
                sim = r.simulated["overall"] if cls == "all" else r.simulated["classes"].get(cls)
            rows.append([r.policy, cls, str(g["requests"]), _pct(g["attainment_slos_serve"]),
                         _pct(sim and sim["attainment_slos_serve"]), _pct(g["attainment_adaserve"]),
                         _pct(sim and sim["attainment_adaserve"]), _ms(g["ttft_p50_s"]), _ms(g["ttft_p99_s"]),
                         _ms(g["tpot_p50_s"]), _ms(g["tpot_p99_s"]), str(g["rejected"]), str(g["failed"]),
                         str(g["unfinished"])])
    return header, rows


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(x[i]) for x in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def check_policy(name: str) -> None:
    """ValueError if the planner has no policy `name` (before a server is started for it)."""
    from sidecar.policies.base import make_policy

    make_policy(name)


def resolve_model_dir(model_dir: str | Path | None) -> Path:
    """The tiny pair: `model_dir` (trained there if missing), else the committed one
    (sglang_slo/assets/tiny), else models/tiny-demo (trained once with `QUICK_TRAIN`)."""
    from sglang_slo.engine.train_tiny import ensure_tiny_pair

    if model_dir is not None:
        return ensure_tiny_pair(model_dir)
    try:
        return ensure_tiny_pair()
    except FileNotFoundError:
        return ensure_tiny_pair(DEFAULT_MODEL_DIR, **QUICK_TRAIN)


def run_served_comparison(policies: tuple[str, ...] | list[str] = ("fcfs", "slo_unified"), *,
                          model_dir: str | Path | None = None, out_dir: str | Path = ROOT / "results",
                          rate: float = 1.6, duration_s: float = 40.0, seed: int = 0,
                          max_duration_s: float = 120.0, hardware: str | Path | None = None,
                          unloaded_tpot_s: float | None = None, placement: tuple[str, str] = ("cpu", "float32"),
                          log=print) -> dict:
    """Replay one trace against the real server under each policy; measured vs simulated attainment.

    policies: planner policies, in order. Unless `unloaded_tpot_s` (seconds) is given, a first
    server without the draft measures the unloaded TPOT that scales the trace's SLOs (`calibrate`).
    Every policy's server gets the same warm-up (its own warm-up TPOT is reported). A policy whose
    server fails is reported and skipped (RuntimeError if all fail). rate: arrivals (agent loops count once) per
    second over `duration_s` seconds; max_duration_s: per-policy replay limit. hardware: the
    CPU hardware profile for the servers' planner and the simulator (default
    configs/hardware/cpu-tiny.yaml; without one the servers use their default and no
    simulation is run). placement: (device, dtype) of every server's models and KV cache.
    Returns the JSON document also written to out_dir/served_demo.json.
    """
    if not policies:
        raise ValueError("policies must not be empty")
    if max_duration_s <= 0:
        raise ValueError("max_duration_s must be positive")
    demo_trace(unloaded_tpot_s or 0.01, rate=rate, duration_s=duration_s, seed=seed)  # bad sizes fail before any server
    t_start = time.monotonic()
    model = resolve_model_dir(model_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hw = Path(hardware) if hardware else (CPU_PROFILE if CPU_PROFILE.is_file() else None)
    if hw is not None and not hw.is_file():
        raise ValueError(f"hardware profile not found: {hw}")
    from sglang_slo.engine.tokenizer import Tokenizer

    runs: list[PolicyRun] = []
    failed: list[PolicyRun] = []
    runnable = []
    for policy in policies:  # before any server starts
        try:
            check_policy(policy)
            runnable.append(policy)
        except ValueError as e:
            log(f"served demo: {policy}: FAILED: {e}")
            failed.append(PolicyRun(policy, {}, None, error=str(e)))
    if not runnable:
        raise RuntimeError("no policy can run: " + "; ".join(f"{r.policy}: {r.error[:300]}" for r in failed))
    prompts = PromptTexts(Tokenizer.load(model / "target"))
    server_args = ("--device", placement[0], "--dtype", placement[1])
    calibration = {"unloaded_tpot_s": unloaded_tpot_s, "source": "given"}
    if unloaded_tpot_s is None:
        unloaded_tpot_s = calibrate(model, prompts, out / "logs" / "served-calibration.log", hw, server_args)
        calibration = {"unloaded_tpot_s": unloaded_tpot_s, "source": f"measured: {CALIBRATION_POLICY}, no speculation"}
        log(f"served demo: unloaded TPOT {unloaded_tpot_s * 1000:.1f} ms ({calibration['source']})")
    w: Workload | None = None
    for policy in runnable:
        t0 = time.monotonic()
        try:
            with ServerProcess.for_pair(model, policy, out / "logs" / f"served-{policy}.log", hardware=hw,
                               unloaded_tpot_s=unloaded_tpot_s, extra_args=server_args) as srv:
                startup = time.monotonic() - t0
                own_tpot = measure_unloaded_tpot(srv.url, prompts)  # every server gets the same warm-up
                if w is None:
                    w = demo_trace(unloaded_tpot_s, rate=rate, duration_s=duration_s, seed=seed)
                    log(f"served demo: {len(w.requests)} requests, {rate:g} arrivals/s over {duration_s:g} s")
                res: ReplayResult = replay_sync(w, ClientConfig(base_url=srv.url), prompts,
                                                ReplayConfig(max_duration_s=max_duration_s))
        except (RuntimeError, TimeoutError, OSError) as e:  # one policy's server failed: keep going
            log(f"served demo: {policy}: FAILED: {str(e)[:2000]}")
            failed.append(PolicyRun(policy, {}, None, error=str(e)[:2000]))
            continue
        measured = summarize(res.records, res.window_s)
        simulated = _simulate(w, hw, policy) if hw is not None else None
        run = PolicyRun(policy, measured, simulated, res.stats, res.elapsed_s, startup, own_tpot)
        runs.append(run)
        o = measured["overall"]
        log(f"served demo: {policy}: SLOs-Serve {_pct(o['attainment_slos_serve'])}, AdaServe "
            f"{_pct(o['attainment_adaserve'])}, {res.stats['outcomes']} in {res.elapsed_s:.0f} s "
            f"(warm-up TPOT {own_tpot * 1000:.1f} ms)"
            + ("" if simulated is None else f"; simulator predicts SLOs-Serve "
               f"{_pct(simulated['overall']['attainment_slos_serve'])}"))
    if not runs:
        raise RuntimeError("no policy's server ran: " + "; ".join(f"{r.policy}: {r.error[:300]}" for r in failed))
    header, rows = side_by_side(runs)
    table = text_table(header, rows)
    note = ("" if hw is not None else "no CPU hardware profile (configs/hardware/cpu-tiny.yaml; make it with "
            "`sglang-slo profile`): simulator columns empty")
    if failed:
        why = [f"{r.policy} did not run: {(r.error.splitlines() or ['?'])[0][:200]}" for r in failed]
        note = "; ".join([note] * bool(note) + why)
    head = (f"tiny pair {model} on {placement[0]} ({placement[1]}); {len(w.requests)} requests ({rate:g} arrivals/s over {duration_s:g} s, seed {seed}); "
            f"unloaded TPOT {unloaded_tpot_s * 1000:.1f} ms; SLOs = m x unloaded TPOT; hardware profile "
            f"{hw.name if hw else 'none'}")
    log("\n== served comparison: " + head + ("\n" + note if note else "") + "\n" + table)
    doc = {"policies": list(policies), "model_dir": str(model), "hardware": str(hw) if hw else None,
           "device": placement[0], "dtype": placement[1],
           "unloaded_tpot_s": unloaded_tpot_s, "calibration": calibration, "rate": rate, "duration_s": duration_s, "seed": seed,
           "requests": len(w.requests), "runs": [asdict(r) for r in runs + failed],
           "wall_s": time.monotonic() - t_start}
    (out / "served_demo.json").write_text(json.dumps(doc, indent=1))
    md = ["# Served comparison: real `sglang-slo serve` per policy vs the simulator", "", head, "",
          "Attainment: SLOs-Serve = TTFT met and every token by its stage-aware deadline; AdaServe = mean "
          "TPOT within the SLO per stage. 429/400 responses and unfinished requests are misses.", "",
          *([note, ""] if note else []), markdown_table(header, rows), ""]
    (out / "served_demo.md").write_text("\n".join(md))
    log(f"wrote {out / 'served_demo.json'} and {out / 'served_demo.md'} ({doc['wall_s']:.0f} s)")
    return doc


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policies", default="fcfs,slo_unified", help="comma-separated planner policies")
    p.add_argument("--model-dir", default=None, help="tiny pair directory (target/, draft/); trained if missing")
    p.add_argument("--out-dir", default=str(ROOT / "results"))
    p.add_argument("--rate", type=float, default=1.6, help="arrivals per second")
    p.add_argument("--duration-s", type=float, default=40.0, help="arrival window, seconds")
    p.add_argument("--max-duration-s", type=float, default=120.0, help="per-policy replay limit, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hardware", default=None, help="CPU hardware profile (default configs/hardware/cpu-tiny.yaml)")
    p.add_argument("--unloaded-tpot-ms", type=float, default=None, help="skip the measurement, use this")
    add_device_arguments(p)


def run(args: argparse.Namespace) -> int:
    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    try:
        run_served_comparison(policies, model_dir=args.model_dir, out_dir=args.out_dir, rate=args.rate,
                              duration_s=args.duration_s, seed=args.seed, max_duration_s=args.max_duration_s,
                              hardware=args.hardware, placement=(args.device, args.dtype),
                              unloaded_tpot_s=args.unloaded_tpot_ms / 1000 if args.unloaded_tpot_ms else None)
    except (ValueError, RuntimeError, TimeoutError) as e:
        print(f"served demo: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m eval.demo_serve", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
