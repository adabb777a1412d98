"""`python -m eval.bench_client`: timing accuracy and cost of the load client (prints JSON).

Starts eval.stub_server as its own process (fixed TTFT and TPOT, one token per chunk), replays
`concurrency` simultaneous requests per level and reports when the stub received each request
(send lag: client scheduling + HTTP set-up + the stub's accept, ms after the intended send time),
how far the recorded TTFT and mean TPOT are from the stub's true values (both sides' lag) and
the client's CPU seconds per 1000 streamed tokens. On 2 shared cores the error grows with
concurrency; it bounds how tight an SLO the harness can judge.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from eval.load_client import ClientConfig
from eval.metrics import Outcome
from eval.prompt_text import PromptTexts
from eval.replay import ReplayConfig, replay_sync
from eval.demo_serve import free_port
from eval.workloads import GenRequest, Workload
from protos.messages import Slo

ROOT = Path(__file__).resolve().parent.parent


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def bench_level(url: str, prompts: PromptTexts, concurrency: int, output_tokens: int, ttft_s: float,
                tpot_s: float) -> dict:
    slo = Slo(ttft_s=10.0, tpot_s=1.0, slo_class="chat")
    reqs = [GenRequest(rid=f"b{i}", arrival_s=0.0, prompt_tokens=32, output_tokens=output_tokens, slo=slo,
                       alphas=[]) for i in range(concurrency)]
    w = Workload(name="bench", rate=1.0, duration_s=1.0, seed=0, requests=reqs)
    seen = len(httpx.get(url + "/received", timeout=10).json())
    cpu0, t0 = _cpu_s(), time.perf_counter()
    res = replay_sync(w, ClientConfig(base_url=url), prompts, ReplayConfig(max_duration_s=300))
    wall, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    recv = httpx.get(url + "/received", timeout=10).json()[seen:]
    send_lag = np.array([e["t_recv"] - res.started_at for e in recv]) * 1000  # ms after the intended send (0)
    ok = [c.record for c in res.calls if c.record.outcome is Outcome.FINISHED]
    ttft_err = np.array([r.ttft_s - ttft_s for r in ok]) * 1000  # ms
    tpot_err = np.array([r.tpot_s - tpot_s for r in ok]) * 1000  # ms
    tokens = sum(len(r.token_times) for r in ok)
    return {"concurrency": concurrency, "finished": len(ok), "tokens": tokens, "wall_s": round(wall, 3),
            "send_lag_ms_p50": round(float(np.percentile(send_lag, 50)), 3),
            "send_lag_ms_p99": round(float(np.percentile(send_lag, 99)), 3),
            "ttft_err_ms_p50": round(float(np.percentile(ttft_err, 50)), 3),
            "ttft_err_ms_p99": round(float(np.percentile(ttft_err, 99)), 3),
            "tpot_err_ms_mean": round(float(tpot_err.mean()), 3),
            "tpot_err_ms_p99": round(float(np.percentile(tpot_err, 99)), 3),
            "client_cpu_s_per_1k_tokens": round(cpu / max(tokens, 1) * 1000, 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.bench_client", description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", default="16,64,256", help="comma-separated simultaneous requests per level")
    p.add_argument("--output-tokens", type=int, default=50)
    p.add_argument("--ttft-ms", type=float, default=50.0)
    p.add_argument("--tpot-ms", type=float, default=20.0)
    a = p.parse_args(argv)
    from sglang_slo.engine.tokenizer import Tokenizer, read_texts, stdlib_text_files

    prompts = PromptTexts(Tokenizer.train(read_texts(stdlib_text_files(), max_bytes=200_000), vocab_size=512))
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "eval.stub_server", "--port", str(port), "--ttft-ms",
                             str(a.ttft_ms), "--tpot-ms", str(a.tpot_ms)], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                print(json.dumps({"error": "stub server did not start"}))
                return 1
            time.sleep(0.1)
        levels = [bench_level(url, prompts, int(c), a.output_tokens, a.ttft_ms / 1000, a.tpot_ms / 1000)
                  for c in a.concurrency.split(",") if c.strip()]
    finally:
        proc.terminate()
        proc.wait(10)
    print(json.dumps({"bench": "load_client", "ttft_ms": a.ttft_ms, "tpot_ms": a.tpot_ms,
                      "output_tokens": a.output_tokens, "levels": levels}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
