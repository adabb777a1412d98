"""Per-iteration cost of the sglang-slo plugin: pure decode at fixed batch sizes, side by side.

    python -m tests.sglang_support.plugin_overhead [--configs default,plugin,...] [--batch-sizes 1,4,8]
                                                   [--tokens 300] [--repeats 2] [--json]

(run it under `flock /tmp/sglang-slo-bench.lock` on the shared machine; ~1 min per config
and repeat). For every repeat, every config gets a fresh real SGLang 0.5.23 CPU server on the
tiny Llama (configs in alternating order, so load drift hits them alike); on it, for every
batch size N, N concurrent /generate requests of `--tokens` output tokens each (ignore_eos,
a short prompt, no other traffic) run to completion, twice. Per-iteration time is SGLang's own:
its "Decode batch" log line every `--log-interval` decode iterations gives
`gen throughput` over that window, so one iteration = N / throughput (windows with exactly N
running and none queued; the first window after an idle gap is dropped). With the plugin's
iteration log on, its launch-to-launch times of the N-request decode iterations are reported
too (`report_log_ms`). `client_ms_per_token`: the batch's wall time / tokens (includes the
prefill and HTTP). `per_iteration`: the scheduler's and the sidecar's /proc schedstat deltas per
decode iteration (CPU us, run-queue wait us, timeslices), where CPU contention shows up.
`loadavg` is /proc/loadavg before and after each config's run.

Configs:
  default         SGLang as shipped (plugins off)
  default-prio    SGLang as shipped + --enable-priority-scheduling (the plugin configs' flag)
  plugin          + plugin + sidecar (slo_unified) + SGLANG_SLO_REPORT_LOG (tests' / compare's setup)
  plugin-nolog    + plugin + sidecar, SGLANG_SLO_REPORT_LOG unset
  plugin-nosidecar  + plugin, no planner (launcher --no-planner: SGLANG_SLO_PLANNER unset)
  plugin-nice     plugin, the sidecar 10 nice levels below the engine (launcher --planner-nice 10)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.sglang_support.cpu_server import SglangCpuServer
from tests.sglang_support.tiny_llama import make_tiny_llama

PROBE = Path(__file__).resolve().parent / "profile_probe"
PRIO = ("--enable-priority-scheduling",)
CONFIGS = {  # name -> (plugin, extra SGLang args, report log on, sidecar on, launcher args)
    "default": (False, (), False, False, ()),
    "default-prio": (False, PRIO, False, False, ()),
    "plugin": (True, PRIO, True, True, ()),
    "plugin-nolog": (True, PRIO, False, True, ()),
    "plugin-nosidecar": (True, PRIO, True, False, ()),
    "plugin-nice": (True, PRIO, True, True, ("--planner-nice", "10")),
}
DECODE_RE = re.compile(r"Decode batch.*?#running-req:\s*(\d+),.*?gen throughput \(token/s\):\s*([0-9.]+),\s*"
                       r"#queue-req:\s*(\d+)")
PROMPT = "def main():\n    return json.dumps(x)\n"


def make_server(name: str, model: Path, workdir: Path, log_interval: int, profile: str | None):
    plugin, extra, report_log, sidecar, launcher = CONFIGS[name]
    workdir.mkdir(parents=True, exist_ok=True)
    srv = SglangCpuServer(model, plugin=plugin, workdir=workdir, launcher_args=launcher,
                          extra_args=(*extra, "--decode-log-interval", str(log_interval)))
    if plugin and not sidecar:
        i = srv.cmd.index("--")
        srv.cmd[i:i] = ["--no-planner"]
    if plugin and not report_log:
        srv.env.pop("SGLANG_SLO_REPORT_LOG", None)
    if profile:
        srv.env["PYTHONPATH"] = os.pathsep.join((str(PROBE), srv.env["PYTHONPATH"]))
        if profile == "cprofile":
            srv.env["SGLANG_SLO_PROFILE_OUT"] = str(workdir / "scheduler.prof")
        else:
            srv.env["SGLANG_SLO_HOOK_TIMES"] = str(workdir / "hook-times.json")
    return srv


def generate(url: str, tokens: int, i: int) -> float:
    t0 = time.monotonic()
    r = httpx.post(url + "/generate", timeout=300, json={
        "text": f"{PROMPT}# {i}\n", "sampling_params": {"max_new_tokens": tokens, "ignore_eos": True,
                                                      "temperature": 0.0}})
    r.raise_for_status()
    got = r.json()["meta_info"]["completion_tokens"]
    if got != tokens:
        raise RuntimeError(f"asked for {tokens} tokens, got {got}")
    return time.monotonic() - t0


def run_batch(url: str, n: int, tokens: int) -> float:
    t0 = time.monotonic()
    with ThreadPoolExecutor(n) as ex:
        list(ex.map(lambda i: generate(url, tokens, i), range(n)))
    return time.monotonic() - t0


def decode_windows(lines: list[str], n: int) -> list[float]:
    """ms per decode iteration of each logged window with exactly n running, none queued.

    The first matching window of a batch is dropped (its timer started before the prefill /
    the idle gap)."""
    out, prev_ok = [], False
    for line in lines:
        m = DECODE_RE.search(line)
        if not m:
            continue
        running, tput, queued = int(m[1]), float(m[2]), int(m[3])
        ok = running == n and queued == 0 and tput > 0
        if ok and prev_ok:
            out.append(1000.0 * n / tput)
        prev_ok = ok
    return out


def report_log_iters(lines: list[str], n: int) -> list[float]:
    """ms launch-to-launch of the plugin-logged decode iterations with n requests."""
    out = []
    for line in lines:
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if d.get("mode") == "decode" and len(d.get("rids", ())) == n and d["end_s"] > d["start_s"]:
            out.append(1000.0 * (d["end_s"] - d["start_s"]))
    return out[3:]  # first iterations after the prefill


def _read_new(path: Path, offset: int) -> tuple[list[str], int]:
    if not path.exists():
        return [], offset
    data = path.read_bytes()
    return data[offset:].decode("utf-8", "replace").splitlines(), len(data)


def summary(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    xs = sorted(xs)
    return {"n": len(xs), "median_ms": round(statistics.median(xs), 3), "p10_ms": round(xs[len(xs) // 10], 3),
            "p90_ms": round(xs[(9 * len(xs)) // 10], 3), "mean_ms": round(statistics.fmean(xs), 3)}


def sched_stats(srv: SglangCpuServer) -> dict[str, tuple[int, int, int]]:
    """comm -> summed /proc/<pid>/schedstat (ns on CPU, ns waiting on a run queue, timeslices) of
    the server's scheduler and sidecar processes (main threads)."""
    out: dict[str, tuple[int, int, int]] = {}
    for pid, comm in srv.descendants().items():
        key = "scheduler" if comm.startswith("sglang::schedul") else "sidecar" if pid in srv.sidecar_pids() else None
        if key is None:
            continue
        try:
            run, wait, slices = map(int, Path(f"/proc/{pid}/schedstat").read_text().split())
        except (OSError, ValueError):
            continue
        a = out.get(key, (0, 0, 0))
        out[key] = (a[0] + run, a[1] + wait, a[2] + slices)
    return out


def sched_delta(before: dict, after: dict, iterations: int) -> dict:
    """Per decode iteration: CPU us, run-queue wait us, timeslices (preemptions + wake-ups)."""
    out = {}
    for k, (r1, w1, s1) in after.items():
        r0, w0, s0 = before.get(k, (0, 0, 0))
        out[k] = {"cpu_us": round((r1 - r0) / 1e3 / iterations, 1), "runq_wait_us": round((w1 - w0) / 1e3 / iterations, 1),
                  "slices": round((s1 - s0) / iterations, 2)}
    return out


def measure(name: str, model: Path, workdir: Path, args) -> dict:
    srv = make_server(name, model, workdir, args.log_interval, args.profile).start()
    res: dict = {"loadavg_before": Path("/proc/loadavg").read_text().split()[:3], "batch": {}}
    try:
        run_batch(srv.url, 2, 40)  # warm-up
        log_off, rep_off = _read_new(srv.log, 0)[1], _read_new(srv.report_log, 0)[1]
        for n in args.batch_sizes:
            walls, sg, rep = [], [], []
            st0 = sched_stats(srv)
            for _ in range(args.rounds):
                walls.append(run_batch(srv.url, n, args.tokens))
                time.sleep(0.3)  # the last log lines flush
                lines, log_off = _read_new(srv.log, log_off)
                rl, rep_off = _read_new(srv.report_log, rep_off)
                sg += decode_windows(lines, n)
                rep += report_log_iters(rl, n)
            res["batch"][n] = {"sglang_ms_per_iter": summary(sg), "report_log_ms": summary(rep),
                               "client_ms_per_token": round(1000 * min(walls) / args.tokens, 3),
                               "per_iteration": sched_delta(st0, sched_stats(srv), args.rounds * args.tokens)}
    finally:
        srv.stop()
    res["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    for f in sorted(workdir.glob("hook-times.json.*")):  # --profile hooks: the scheduler's last dump
        d = json.loads(f.read_text())
        n = max(d["reports"], 1)
        res["hook_us_per_report"] = {k: {"calls_per_report": round(c / n, 2), "us": round(1e6 * t / n, 2), **q}
                                     for k, (c, t, q) in sorted(d["hooks"].items())}
        res["hook_us_per_report_total"] = round(sum(v["us"] for v in res["hook_us_per_report"].values()), 2)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.sglang_support.plugin_overhead",
                                description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="default,plugin,plugin-nosidecar,plugin-nolog",
                   help=f"comma-separated, from: {', '.join(CONFIGS)}")
    p.add_argument("--batch-sizes", default="1,4,8")
    p.add_argument("--tokens", type=int, default=300, help="output tokens per request")
    p.add_argument("--rounds", type=int, default=2, help="batches per batch size per server")
    p.add_argument("--repeats", type=int, default=2, help="fresh servers per config (order alternates)")
    p.add_argument("--log-interval", type=int, default=10, help="SGLang --decode-log-interval")
    p.add_argument("--profile", choices=["cprofile", "hooks"], default=None,
                   help="profile_probe/ on the server's PYTHONPATH: cProfile the scheduler loop "
                        "(<workdir>/<config>-<repeat>/scheduler.prof.<pid>) or time every plugin hook with "
                        "perf_counter (hook-times.json.<pid>: calls, seconds and per-call quantiles per hook)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not names or any(c not in CONFIGS for c in names):
        p.error(f"configs must come from {', '.join(CONFIGS)}")
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sglang-overhead-"))
    model = make_tiny_llama(work / "tiny")
    t0 = time.monotonic()
    runs: dict = {n: [] for n in names}
    for r in range(args.repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            runs[n].append(measure(n, model, work / f"{n}-{r}", args))
    agg = {}
    for n in names:
        agg[n] = {}
        for b in args.batch_sizes:
            meds = [x["batch"][b]["sglang_ms_per_iter"].get("median_ms") for x in runs[n]]
            agg[n][b] = {"sglang_ms_per_iter_medians": meds,
                         "client_ms_per_token": [x["batch"][b]["client_ms_per_token"] for x in runs[n]],
                         "report_log_ms_medians": [x["batch"][b]["report_log_ms"].get("median_ms") for x in runs[n]],
                         "scheduler_per_iteration": [x["batch"][b]["per_iteration"].get("scheduler") for x in runs[n]],
                         "sidecar_per_iteration": [x["batch"][b]["per_iteration"].get("sidecar") for x in runs[n]]}
    doc = {"engine": "SGLang 0.5.23 CPU, tiny Llama (2x64, fp32), torch_native, OMP_NUM_THREADS=1",
           "tokens": args.tokens, "rounds": args.rounds, "repeats": args.repeats, "log_interval": args.log_interval,
           "summary": agg, "runs": runs, "wall_s": round(time.monotonic() - t0, 1), "workdir": str(work)}
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        for n, per in agg.items():
            print(n, {b: v["sglang_ms_per_iter_medians"] for b, v in per.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
