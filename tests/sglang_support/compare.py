"""Side by side on CPU: SGLang's default scheduler vs SGLang + sglang-slo plugin + slo_unified.

    python -m tests.sglang_support.compare [--rate 6] [--duration 30] [--seed 0] [--json]

Both runs use the real SGLang 0.5.23 CPU server on the tiny Llama (tests/sglang_support), the
same trace (eval.demo_serve.demo_trace: coding, chat, tool-calling and reasoning classes with
SLOs scaled to the unloaded TPOT measured on the default server) replayed by eval.replay
(streamed /v1/completions, SLOs in custom_params), scored by eval.metrics (per-class SLO
attainment, SLOs-Serve and AdaServe definitions). No speculation (SGLang's EAGLE needs
sgl-kernel's CPU build). Prints a table, or one JSON document with --json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from tests.sglang_support.cpu_server import SglangCpuServer
from tests.sglang_support.tiny_llama import make_tiny_llama


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
    from eval.demo_serve import measure_unloaded_tpot
    from eval.load_client import ClientConfig
    from eval.metrics import summarize
    from eval.replay import ReplayConfig, replay_sync

    measure_unloaded_tpot(server.url, prompts, requests=1)  # same warm-up on both servers
    res = replay_sync(trace, ClientConfig(base_url=server.url), prompts, ReplayConfig(max_duration_s=max_duration_s))
    out = summarize(res.records, res.window_s)
    out["replay"] = res.stats
    return out


def plan_share(server: SglangCpuServer) -> dict:
    """How many iterations ran under a plan (from the plugin's per-iteration log)."""
    if not server.report_log.exists():
        return {}
    its = [json.loads(line) for line in server.report_log.read_text().splitlines() if line.strip()]
    planned = sum(it["plan_step"] >= 0 for it in its)
    deferred = sum(it["plan_step"] >= 0 and it["mode"] == "decode" and it["waiting"] > 0 for it in its)
    return {"iterations": len(its), "under_plan": planned, "decode_while_waiting_by_plan": deferred}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.sglang_support.compare", description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=6.0, help="arrivals per second")
    p.add_argument("--duration", type=float, default=30.0, help="arrival window, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-duration", type=float, default=120.0, help="per-run replay limit, seconds")
    p.add_argument("--workdir", default=None)
    p.add_argument("--planner-set", action="append", default=[], metavar="KEY=VALUE",
                   help="slo_unified config override for the plugin run (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    args = p.parse_args(argv)

    from eval.demo_serve import demo_trace, measure_unloaded_tpot
    from eval.prompt_text import PromptTexts

    work = Path(args.workdir or tempfile.mkdtemp(prefix="sglang-compare-"))
    model = make_tiny_llama(work / "tiny")
    prompts = PromptTexts(HfTokenizer(model))
    t0 = time.monotonic()
    runs: dict[str, dict] = {}
    trace = None
    unloaded = None
    for name, plugin in (("sglang_default", False), ("sglang_plugin_slo_unified", True)):
        (work / name).mkdir(exist_ok=True)
        srv = SglangCpuServer(model, plugin=plugin, policy="slo_unified", workdir=work / name,
                              extra_args=("--enable-priority-scheduling",) if plugin else (),
                              planner_set=tuple(args.planner_set)).start()
        try:
            if trace is None:
                unloaded = measure_unloaded_tpot(srv.url, prompts)
                trace = demo_trace(unloaded, rate=args.rate, duration_s=args.duration, seed=args.seed)
            runs[name] = run_one(srv, trace, prompts, args.max_duration)
            if plugin:
                runs[name]["plan"] = plan_share(srv)
        finally:
            srv.stop()
    doc = {"engine": "SGLang 0.5.23 CPU, tiny Llama (2x64, fp32), torch_native, no speculation",
           "unloaded_tpot_s": unloaded, "rate": args.rate, "duration_s": args.duration, "seed": args.seed,
           "requests": len(trace.requests), "planner_set": args.planner_set, "runs": runs, "wall_s": round(time.monotonic() - t0, 1), "workdir": str(work)}
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    classes = sorted(set().union(*(r["classes"] for r in runs.values())))
    print(f"{'class':<14}" + "".join(f"{n:>30}" for n in runs))
    for c in ["overall", *classes]:
        cells = []
        for r in runs.values():
            g = r["overall"] if c == "overall" else r["classes"].get(c, {})
            a, b = g.get("attainment_slos_serve"), g.get("attainment_adaserve")
            cells.append(f"{'-' if a is None else f'{a:.0%}'} / {'-' if b is None else f'{b:.0%}'}".rjust(30))
        print(f"{c:<14}" + "".join(cells))
    print("(SLOs-Serve / AdaServe attainment)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
