"""Side by side on CPU: SGLang's default scheduler vs SGLang + sglang-slo plugin + slo_unified.

    python -m tests.sglang_support.compare [--rate 6 | --rates 4,6,8,10,12] [--configs default,plugin]
                                           [--interleave] [--unloaded-tpot S] [--duration 30] [--seed 0] [--json]

Every config uses the real SGLang 0.5.23 CPU server on the tiny Llama (tests/sglang_support), the
same traces (eval.demo_serve.demo_trace: coding, chat, tool-calling and reasoning classes with
SLOs scaled to the unloaded TPOT measured once on the default server) replayed by eval.replay
(streamed /v1/completions, SLOs in custom_params), scored by eval.metrics (per-class SLO
attainment, SLOs-Serve and AdaServe definitions). No speculation (SGLang's EAGLE needs
sgl-kernel's CPU build). One server per config serves the whole rate ladder (rates in order,
the same seed at every rate), or with --interleave fresh servers per rate, configs alternating. Capacity = the highest ladder rate with attainment >= 90%
(eval.capacity's rule), per definition, overall and per class. Batch shapes come from SGLang's
own "Prefill batch" log lines and, with the plugin, its per-iteration plan log
(batch_stats.py). Prints a table, or one JSON document with --json.

Configs: default (SGLang as shipped), plugin (+ plugin, slo_unified, priority scheduling),
default-mixed / plugin-mixed (the same with SGLang's --enable-mixed-chunk: decoders ride along
in prefill forwards).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from eval.demo_serve import demo_trace, measure_unloaded_tpot
from tests.sglang_support.batch_stats import plan_effects, prefill_batches
from tests.sglang_support.cpu_server import SglangCpuServer
from tests.sglang_support.tiny_llama import make_tiny_llama

TARGET = 0.9  # attainment that counts as serving a rate (DistServe / SLOs-Serve convention)
DEFINITIONS = ("slos_serve", "adaserve")


@dataclass(frozen=True)
class ServerConfig:
    """One side of the comparison."""

    name: str
    """Key in the JSON output."""
    plugin: bool
    extra_args: tuple[str, ...] = ()
    """Extra SGLang server arguments."""


CONFIGS = {
    "default": ServerConfig("sglang_default", False),
    "plugin": ServerConfig("sglang_plugin_slo_unified", True, ("--enable-priority-scheduling",)),
    "default-mixed": ServerConfig("sglang_default_mixed_chunk", False, ("--enable-mixed-chunk",)),
    "plugin-mixed": ServerConfig("sglang_plugin_slo_unified_mixed_chunk", True,
                                 ("--enable-priority-scheduling", "--enable-mixed-chunk")),
}


class HfTokenizer:
    """`eval.prompt_text.TextTokenizer` over the tiny model's tokenizer.json."""

    def __init__(self, model_dir: Path):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def run_one(server: SglangCpuServer, trace, prompts, max_duration_s: float) -> dict:
    from eval.load_client import ClientConfig
    from eval.metrics import summarize
    from eval.replay import ReplayConfig, replay_sync

    measure_unloaded_tpot(server.url, prompts, requests=1)  # the same warm-up before every rate
    res = replay_sync(trace, ClientConfig(base_url=server.url), prompts, ReplayConfig(max_duration_s=max_duration_s))
    out = summarize(res.records, res.window_s)
    out["replay"] = res.stats
    out["ttft_met"] = ttft_met(res.records)
    return out


def ttft_met(records) -> dict:
    """Share of requests per class whose first token came within their TTFT (where misses start)."""
    by: dict[str, list[bool]] = {}
    for r in records:
        by.setdefault(r.slo.slo_class or "-", []).append(r.ttft_s is not None and r.ttft_s <= r.slo.ttft_s)
    return {c: round(sum(v) / len(v), 3) for c, v in sorted(by.items())}


class LogCursor:
    """New lines of a growing log file since the last call."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def new_lines(self) -> list[str]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        return data.decode("utf-8", "replace").splitlines()


def capacity(rates: list[float], results: dict[float, dict]) -> dict:
    """Highest rate whose attainment >= TARGET, per definition, overall and per class (0 = none)."""
    def best(get) -> dict:
        out = {}
        for d in DEFINITIONS:
            ok = [r for r in rates if (get(results[r]).get(f"attainment_{d}") or 0.0) >= TARGET]
            out[d] = max(ok, default=0.0)
        return out

    classes = sorted(set().union(*(results[r]["classes"] for r in rates)))
    return {"overall": best(lambda s: s["overall"]),
            "classes": {c: best(lambda s, c=c: s["classes"].get(c, {})) for c in classes}}


def run_ladder(cfg: ServerConfig, model: Path, workdir: Path, rates: list[float], traces: dict, prompts,
               args) -> dict:
    """Start `cfg`'s server once, replay every rate's trace on it, stop it."""
    workdir.mkdir(parents=True, exist_ok=True)
    srv = SglangCpuServer(model, plugin=cfg.plugin, policy=args.policy, workdir=workdir, extra_args=cfg.extra_args,
                          planner_set=tuple(args.planner_set)).start()
    out: dict = {"extra_args": list(cfg.extra_args), "rates": {}}
    try:
        if traces.get("unloaded_tpot_s") is None:
            traces["unloaded_tpot_s"] = measure_unloaded_tpot(srv.url, prompts)
        server_log, plan_log = LogCursor(srv.log), LogCursor(srv.report_log)
        for rate in rates:
            if rate not in traces:
                traces[rate] = demo_trace(traces["unloaded_tpot_s"], rate=rate, duration_s=args.duration,
                                          seed=args.seed)
            server_log.new_lines(), plan_log.new_lines()  # skip what came before this rate
            res = run_one(srv, traces[rate], prompts, args.max_duration)
            res["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
            res["batches"] = prefill_batches(server_log.new_lines(), mixed="--enable-mixed-chunk" in cfg.extra_args)
            if cfg.plugin:
                res["plan"] = plan_effects(json.loads(x) for x in plan_log.new_lines() if x.strip())
            out["rates"][rate] = res
    finally:
        srv.stop()
    out["capacity"] = capacity(rates, out["rates"])
    return out


def interleaved(names: list[str], model: Path, work: Path, rates: list[float], traces: dict, prompts, args) -> dict:
    """Every rate runs on fresh servers of every config, config order reversed at every other
    rate: load drift on a shared machine hits all configs alike (costs a server start per run)."""
    runs: dict = {}
    for i, rate in enumerate(rates):
        for n in names if i % 2 == 0 else names[::-1]:
            cfg = CONFIGS[n]
            one = run_ladder(cfg, model, work / cfg.name / f"rate-{rate:g}", [rate], traces, prompts, args)
            runs.setdefault(cfg.name, {"extra_args": one["extra_args"], "rates": {}})["rates"][rate] = one["rates"][rate]
    for r in runs.values():
        r["capacity"] = capacity(rates, r["rates"])
    return {CONFIGS[n].name: runs[CONFIGS[n].name] for n in names}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.sglang_support.compare", description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=6.0, help="arrivals per second (one rate)")
    p.add_argument("--rates", default="", help="comma-separated rate ladder, e.g. 4,6,8,10,12 (overrides --rate)")
    p.add_argument("--configs", default="default,plugin", help=f"comma-separated, from: {', '.join(CONFIGS)}")
    p.add_argument("--policy", default="slo_unified", help="planner policy of the plugin configs")
    p.add_argument("--duration", type=float, default=30.0, help="arrival window, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-duration", type=float, default=120.0, help="per-rate replay limit, seconds")
    p.add_argument("--unloaded-tpot", type=float, default=None,
                   help="seconds: scale the SLO classes to this instead of measuring it on the first config "
                        "(same SLOs across separate commands)")
    p.add_argument("--interleave", action="store_true",
                   help="fresh servers per rate, configs alternating (fairer on a shared machine, slower)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--planner-set", action="append", default=[], metavar="KEY=VALUE",
                   help="planner policy config override for the plugin configs (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    args = p.parse_args(argv)
    try:
        rates = [float(x) for x in args.rates.split(",")] if args.rates else [args.rate]
    except ValueError:
        p.error(f"--rates must be comma-separated numbers, got {args.rates!r}")
    if any(r <= 0 for r in rates) or (args.unloaded_tpot is not None and args.unloaded_tpot <= 0):
        p.error("rates and --unloaded-tpot must be > 0")
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown or not names:
        p.error(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")

    from eval.prompt_text import PromptTexts

    work = Path(args.workdir or tempfile.mkdtemp(prefix="sglang-compare-"))
    model = make_tiny_llama(work / "tiny")
    prompts = PromptTexts(HfTokenizer(model))
    t0 = time.monotonic()
    traces: dict = {"unloaded_tpot_s": args.unloaded_tpot}  # None: measured on the first config
    if args.interleave:
        runs = interleaved(names, model, work, rates, traces, prompts, args)
    else:
        runs = {CONFIGS[n].name: run_ladder(CONFIGS[n], model, work / CONFIGS[n].name, rates, traces, prompts, args)
                for n in names}
    doc = {"engine": "SGLang 0.5.23 CPU, tiny Llama (2x64, fp32), torch_native, no speculation",
           "unloaded_tpot_s": traces["unloaded_tpot_s"], "rates": rates, "duration_s": args.duration,
           "seed": args.seed, "requests": {r: len(traces[r].requests) for r in rates}, "policy": args.policy,
           "planner_set": args.planner_set, "capacity_target": TARGET,
           "capacity": {n: r["capacity"] for n, r in runs.items()}, "runs": runs,
           "wall_s": round(time.monotonic() - t0, 1), "workdir": str(work)}
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    print_table(runs, rates)
    return 0


def print_table(runs: dict, rates: list[float]) -> None:
    """Per rate, per class: SLOs-Serve / AdaServe attainment of every config; then capacities."""
    for rate in rates:
        per = {n: r["rates"][rate] for n, r in runs.items()}
        classes = sorted(set().union(*(r["classes"] for r in per.values())))
        print(f"rate {rate:g}/s" + " " * 6 + "".join(f"{n:>40}" for n in per))
        for c in ["overall", *classes]:
            cells = []
            for r in per.values():
                g = r["overall"] if c == "overall" else r["classes"].get(c, {})
                a, b = g.get("attainment_slos_serve"), g.get("attainment_adaserve")
                cells.append(f"{'-' if a is None else f'{a:.0%}'} / {'-' if b is None else f'{b:.0%}'}".rjust(40))
            print(f"{c:<16}" + "".join(cells))
    print("capacity (req/s, attainment >= 90%, SLOs-Serve / AdaServe):")
    for n, r in runs.items():
        cap = r["capacity"]["overall"]
        print(f"  {n:<40} {cap['slos_serve']:g} / {cap['adaserve']:g}")


if __name__ == "__main__":
    sys.exit(main())
