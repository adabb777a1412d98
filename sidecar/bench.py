"""`sglang-slo bench-planner`: plan latency per policy and the ZMQ round trip, as JSON.

- Plan latency: for every policy `make_policy` can build, p50/p99 of `Planner.plan()` at
  64, 256, 1024, 4096 active requests (random class mixes, see sidecar/synthetic.py), each
  plan after a fresh IterationReport has been observed (observe time is reported apart).
- Round trip: a real `python -m sidecar` subprocess on an ipc:// endpoint; the engine side
  sends an IterationReport and waits for the Plan; p50/p99 of send -> plan received. Also the
  same work in-process (decode, observe, plan, encode) to separate the sidecar's own cost
  from transport and CPU-scheduling noise on a shared host, and a bare ZMQ ping-pong (an echo
  process answering each report frame at once, `pingpong_*`) measured the same way just before
  each round trip: the transport and host floor of that minute. Both run once per pause between
  a plan and the next report (`--rt-gap-ms`, default 0 and 1 ms): 0 = back to back (the sidecar's
  post-send upkeep overlaps the next report), 1 ms = engine-like (real iterations take several
  ms). `--rt-pin` puts the engine end and the sidecar (or echo) process on two different CPUs.
Targets (design): slo_unified p99 <= 1 ms at 256 and <= 10 ms at 4096; round trip p99 <= 0.2 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import zmq

from protos import messages as protos
from protos.channel import EngineChannel, ipc_endpoint
from sidecar.cost_model import load_profile
from sidecar.planner import Planner
from sidecar.policies.base import policy_names
from sidecar.synthetic import next_report, random_mix

DEFAULT_HARDWARE = str(Path(__file__).resolve().parent.parent / "configs/hardware/h100-llama3.1-8b-eagle3.yaml")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hardware", default=DEFAULT_HARDWARE, help="hardware profile YAML")
    p.add_argument("--policies", default="", help="comma-separated policy names (default: every buildable one)")
    p.add_argument("--sizes", default="64,256,1024,4096", help="active request counts")
    p.add_argument("--iters", type=int, default=200, help="timed plans per (policy, size); fewer at large sizes")
    p.add_argument("--rt-iters", type=int, default=2000, help="round trips to time")
    p.add_argument("--rt-requests", default="64,1024", help="active request counts for the round-trip test")
    p.add_argument("--rt-policy", default="fcfs", help="policy of the round-trip sidecar")
    p.add_argument("--rt-gap-ms", default="0,1",
                   help="comma-separated pauses between a plan and the next report, ms (an engine sends one report "
                        "per iteration; 0 = back to back, so the sidecar's post-send upkeep lands in the next round trip)")
    p.add_argument("--rt-pin", action="store_true",
                   help="round trips with the engine end on one CPU and the sidecar (or echo) process on another "
                        "(os.sched_setaffinity; the first two CPUs this process may use)")
    p.add_argument("--no-roundtrip", action="store_true", help="skip the subprocess round-trip test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def _ms(xs: list[float]) -> dict[str, float]:
    return {q: round(_pct(xs, v) * 1e3, 4) for q, v in (("p50_ms", 0.5), ("p90_ms", 0.9), ("p99_ms", 0.99))} | {
        "max_ms": round(max(xs) * 1e3, 4), "n": len(xs)}


def bench_plan_latency(policy: str, hardware: str, n: int, iters: int, seed: int) -> dict:
    profile = load_profile(hardware)
    planner = Planner.create(policy, profile)
    hello = protos.EngineHello(
        protos.PROTOCOL_VERSION, "bench", [protos.SpecMode.CHAIN, protos.SpecMode.TREE],
        profile.engine.max_batch_tokens, profile.engine.kv_capacity_tokens,
        profile.engine.max_depth, profile.engine.max_width,
    )
    planner.observe(hello)
    rng = random.Random(seed * 7919 + n)
    arrivals, report = random_mix(rng, n, kv_capacity_tokens=profile.engine.kv_capacity_tokens)
    for a in arrivals:
        planner.observe(a)
    planner.observe(report)
    plan_s, plan_cpu_s, observe_s, sizes = [], [], [], []
    warmup = 5
    for i in range(iters + warmup):
        cpu_t = time.thread_time()
        plan_t = time.perf_counter()
        plan = planner.plan(report.end_s)
        plan_t = time.perf_counter() - plan_t
        cpu_t = time.thread_time() - cpu_t
        report = next_report(report, plan)
        obs_t = time.perf_counter()
        planner.observe(report)
        obs_t = time.perf_counter() - obs_t
        if i >= warmup:
            plan_s.append(plan_t)
            plan_cpu_s.append(cpu_t)
            observe_s.append(obs_t)
            sizes.append(len(plan.decode) + len(plan.prefill))
    # plan: wall time; plan_cpu: this thread's CPU time (excludes being descheduled on a
    # shared host, so it shows the planner's own cost when the wall-time tail is noise).
    return {"plan": _ms(plan_s), "plan_cpu": _ms(plan_cpu_s), "observe": _ms(observe_s),
            "mean_plan_entries": round(sum(sizes) / len(sizes), 1)}


def bench_sidecar_work(hardware: str, policy: str, n_requests: int, iters: int, seed: int) -> dict:
    """What the sidecar process does per round trip, in-process (no sockets, no scheduling
    noise): decode the report frame, observe it, plan, encode the plan ("critical"); then the
    model upkeep the sidecar runs after sending ("upkeep_after_send")."""
    profile = load_profile(hardware)
    planner = Planner.create(policy, profile)
    planner.defer_upkeep = True  # as in PlannerProc
    planner.observe(protos.EngineHello(
        protos.PROTOCOL_VERSION, "bench", [protos.SpecMode.CHAIN], profile.engine.max_batch_tokens,
        profile.engine.kv_capacity_tokens, profile.engine.max_depth, 1))
    arrivals, report = random_mix(random.Random(seed), n_requests, kv_capacity_tokens=profile.engine.kv_capacity_tokens)
    for a in arrivals:
        planner.observe(a)
    work, upkeep = [], []
    for i in range(iters + 10):
        frame = protos.encode(report)
        t0 = time.perf_counter()
        msg = protos.decode(frame)
        planner.observe(msg)
        plan = planner.plan(msg.end_s, step=msg.step + 2)
        protos.encode(plan)
        t1 = time.perf_counter()
        planner.upkeep()
        if i >= 10:
            work.append(t1 - t0)
            upkeep.append(time.perf_counter() - t1)
        report = next_report(report, plan)
    return {"critical": _ms(work), "upkeep_after_send": _ms(upkeep)}


def _await_plan(ch: EngineChannel, timeout_s: float = 5.0) -> protos.Message | None:
    """The next message, polled without sleeping: a real engine never waits for a plan, it
    drains its socket between forwards, so the latency that matters is when the plan lands
    in the engine's queue, not when a blocked engine thread would wake up."""
    deadline = time.perf_counter() + timeout_s
    while (msg := ch.recv(0)) is None:
        if time.perf_counter() > deadline:
            return None
    return msg


def bench_roundtrip(hardware: str, policy: str, n_requests: int, iters: int, seed: int, gap_s: float = 0.0,
                    busy_poll: bool = False, cpus: tuple[int, int] | None = None) -> dict:
    """Engine-side round trip (send a report, see its plan arrive) to a real sidecar process.
    gap_s: untimed pause between a plan and the next report (an engine iteration);
    busy_poll: run the sidecar with --busy-poll (it never sleeps in the kernel);
    cpus: (engine end's CPU, sidecar's CPU) to pin them to, or None."""
    endpoint = ipc_endpoint("bench")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "--endpoint", endpoint, "--policy", policy,
         "--hardware", hardware, "--log-level", "WARNING", *(["--busy-poll"] if busy_poll else []),
         *(["--cpus", str(cpus[1])] if cpus else [])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        cwd=str(Path(__file__).resolve().parent.parent),
    )
    with _engine_end(endpoint, proc, cpus[0] if cpus else None) as ch:
        proc.stdout.readline()  # "listening" line: the socket is bound
        profile = load_profile(hardware)
        hello = protos.EngineHello(
            protos.PROTOCOL_VERSION, "bench", [protos.SpecMode.CHAIN], profile.engine.max_batch_tokens,
            profile.engine.kv_capacity_tokens, profile.engine.max_depth, 1,
        )
        deadline = time.monotonic() + 10
        while not ch.send(hello):
            if time.monotonic() > deadline:
                raise RuntimeError("sidecar did not accept a connection")
            time.sleep(0.005)
        welcome = ch.recv(5000)
        if not isinstance(welcome, protos.PlannerWelcome) or not welcome.accepted:
            raise RuntimeError(f"no welcome: {welcome}")
        rng = random.Random(seed)
        arrivals, report = random_mix(rng, n_requests, kv_capacity_tokens=profile.engine.kv_capacity_tokens)
        for a in arrivals:
            ch.send(a)
        rtt, planner_s = [], []
        plan = None
        for i in range(iters + 20):
            frame = protos.encode(report)  # encoded before timing: the engine's own cost
            t0 = time.perf_counter()
            ch.sock.send(frame)
            plan = _await_plan(ch)
            dt = time.perf_counter() - t0
            if not isinstance(plan, protos.Plan):
                raise RuntimeError(f"expected a plan, got {plan!r}")
            if i >= 20:
                rtt.append(dt)
                planner_s.append(plan.plan_latency_s)
            report = next_report(report, plan)
            if gap_s > 0:
                time.sleep(gap_s)
        return {
            "policy": policy,
            "active_requests": n_requests,
            "gap_ms": gap_s * 1e3,
            "sidecar_busy_poll": busy_poll,
            "cpus": list(cpus) if cpus else None,
            "roundtrip": _ms(rtt),
            "plan_inside": _ms(planner_s),
            "report_bytes": len(protos.encode(report)),
            "plan_bytes": len(protos.encode(plan)) if plan else 0,
        }


@contextlib.contextmanager
def _engine_end(endpoint: str, proc: subprocess.Popen, cpu: int | None):
    """The engine end of a round-trip bench; at exit it closes, then its peer process `proc`
    (killed after 5 s). With `cpu`, this thread and the I/O thread of a fresh ZMQ context run
    on that CPU only while it is open."""
    old_cpus = os.sched_getaffinity(0)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    ctx = zmq.Context() if cpu is not None else None  # its I/O thread starts here, pinned
    ch = EngineChannel(endpoint, ctx)
    try:
        yield ch
    finally:
        ch.close()
        if ctx is not None:
            ctx.term()
        os.sched_setaffinity(0, old_cpus)
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


def echo_server(endpoint: str, reply: bytes, busy_poll: bool = False, cpu: int | None = None) -> None:
    """Bare ZMQ reference for the round trip: a ROUTER that answers every frame with `reply`
    and does nothing else (no decode, no planning), polling like the sidecar's loop and
    pinned to `cpu` like the sidecar's --cpus."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    poller = zmq.Poller()  # the same calls as PlannerChannel
    poller.register(sock, zmq.POLLIN)
    print("listening", flush=True)
    wait_ms = 0 if busy_poll else 50
    while True:
        if poller.poll(wait_ms):
            engine_id, _ = sock.recv_multipart(zmq.NOBLOCK)
            sock.send(engine_id, zmq.SNDMORE | zmq.NOBLOCK)
            sock.send(reply, zmq.NOBLOCK)


def bench_pingpong(hardware: str, n_requests: int, iters: int, seed: int, gap_s: float = 0.0,
                   busy_poll: bool = False, cpus: tuple[int, int] | None = None) -> dict:
    """The round trip's transport alone, measured like `bench_roundtrip` (same report frames,
    same engine-side polling and plan decode) against `echo_server` in a subprocess: what a
    sidecar that took no time at all would show on this host now."""
    profile = load_profile(hardware)
    arrivals, report = random_mix(random.Random(seed), n_requests, kv_capacity_tokens=profile.engine.kv_capacity_tokens)
    reply = protos.encode(protos.Plan(step=0, valid_until_s=0.0, token_budget=1))
    endpoint = ipc_endpoint("pingpong")
    code = (f"from sidecar.bench import echo_server; "
            f"echo_server({endpoint!r}, {reply!r}, {busy_poll!r}, {cpus[1] if cpus else None!r})")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=str(Path(__file__).resolve().parent.parent))
    with _engine_end(endpoint, proc, cpus[0] if cpus else None) as ch:
        proc.stdout.readline()
        frame = protos.encode(report)
        deadline = time.monotonic() + 10
        while not ch.send(report):  # IMMEDIATE: fails until the connection is up
            if time.monotonic() > deadline:
                raise RuntimeError("echo server did not accept a connection")
            time.sleep(0.005)
        if _await_plan(ch) is None:
            raise RuntimeError("echo server did not answer")
        rtt = []
        for i in range(iters + 20):
            t0 = time.perf_counter()
            ch.sock.send(frame)
            if _await_plan(ch) is None:
                raise RuntimeError("echo server stopped answering")
            if i >= 20:
                rtt.append(time.perf_counter() - t0)
            if gap_s > 0:
                time.sleep(gap_s)
        return {"active_requests": n_requests, "gap_ms": gap_s * 1e3, "server_busy_poll": busy_poll,
                "cpus": list(cpus) if cpus else None, "roundtrip": _ms(rtt), "report_bytes": len(frame)}


def run(args: argparse.Namespace) -> int:
    gaps_ms = [float(g) for g in args.rt_gap_ms.split(",") if g]
    if any(g < 0 for g in gaps_ms):
        print("bench-planner: --rt-gap-ms must be >= 0", file=sys.stderr)
        return 2
    cpus = None
    if args.rt_pin:
        allowed = sorted(os.sched_getaffinity(0))
        if len(allowed) < 2:
            print("bench-planner: --rt-pin needs two CPUs", file=sys.stderr)
            return 2
        cpus = (allowed[0], allowed[1])
    wanted = [p for p in args.policies.split(",") if p] or policy_names()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    # The host's load average: on a shared machine p99s measure the neighbours too.
    out: dict = {"hardware": args.hardware, "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(),
                 "plan_latency": {}, "unavailable": {}}
    for name in wanted:
        try:
            Planner.create(name, args.hardware)
        except ValueError as e:
            out["unavailable"][name] = str(e)
            continue
        out["plan_latency"][name] = {}
        for n in sizes:
            iters = max(20, args.iters * 256 // max(n, 256))
            out["plan_latency"][name][str(n)] = bench_plan_latency(name, args.hardware, n, iters, args.seed)
            if not args.json:
                r = out["plan_latency"][name][str(n)]
                w, c = r["plan"], r["plan_cpu"]
                print(f"{name:12s} n={n:5d} plan wall p50 {w['p50_ms']:.3f} p99 {w['p99_ms']:.3f} ms | "
                      f"cpu p50 {c['p50_ms']:.3f} p99 {c['p99_ms']:.3f} ms", flush=True)
    if not args.no_roundtrip:
        out["zmq_roundtrip"] = {}
        for n in (int(x) for x in args.rt_requests.split(",") if x):
            iters = max(100, args.rt_iters * 64 // max(n, 64))
            r = out["zmq_roundtrip"][str(n)] = {}
            for gap in gaps_ms:
                for mode in ("blocking", "busy_poll"):  # the sidecar's two loop modes, side by side
                    busy = mode == "busy_poll"
                    key = mode if gap == 0 else f"{mode}_gap{gap:g}ms"
                    # bare ZMQ ping-pong first, in the same minute: the host's share of the round trip
                    r[f"pingpong_{key}"] = bench_pingpong(args.hardware, n, iters, args.seed, gap / 1e3, busy, cpus)
                    r[key] = bench_roundtrip(args.hardware, args.rt_policy, n, iters, args.seed, gap / 1e3,
                                             busy_poll=busy, cpus=cpus)
                    if not args.json:
                        rt, pp = r[key]["roundtrip"], r[f"pingpong_{key}"]["roundtrip"]
                        print(f"round trip ({args.rt_policy}, {n} req, sidecar {mode}, gap {gap:g} ms): "
                              f"p50 {rt['p50_ms']:.3f} p90 {rt['p90_ms']:.3f} p99 {rt['p99_ms']:.3f} ms | bare ZMQ "
                              f"ping-pong p50 {pp['p50_ms']:.3f} p99 {pp['p99_ms']:.3f} ms", flush=True)
            r["sidecar_work_inprocess"] = bench_sidecar_work(args.hardware, args.rt_policy, n, iters, args.seed)
    out["loadavg_end"] = os.getloadavg()
    if args.json:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m sidecar.bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
