"""`python -m sglang_slo.server.bench_http`: SGLang's own load client against `sglang-slo serve`.

Starts the server (real sidecar), runs `python -m sglang.bench_serving` once per backend
(`sglang-oai` -> /v1/completions, `sglang-oai-chat` -> /v1/chat/completions, `sglang` ->
/generate) with `--goodput`, and prints one JSON summary: per backend the success count,
throughput, TTFT/TPOT, goodput and SLO attainment as bench_serving computed them, plus the
server's own per-class attainment from /metrics. Needs sglang + datasets importable.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BACKENDS = ("sglang-oai", "sglang-oai-chat", "sglang")
_KEYS = ("completed", "duration", "request_throughput", "output_throughput", "mean_ttft_ms", "p99_ttft_ms",
         "mean_tpot_ms", "p99_tpot_ms", "request_goodput", "slo_attainment", "slo_attainment_by_metric", "accept_length")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError("server did not become ready")


def _server_attainment(url: str) -> dict:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("sglang_slo_slo_attainment{"):
            key, _, value = line.rpartition(" ")
            out[key.split('"')[1]] = round(float(value), 4)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sglang_slo.server.bench_http", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--draft", default=None)
    p.add_argument("--policy", default="slo_unified")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--num-prompts", type=int, default=40)
    p.add_argument("--request-rate", type=float, default=8.0)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--goodput", default="ttft:2000 tpot:200", help="bench_serving --goodput bounds (ms)")
    p.add_argument("--out", default=None, help="also write the JSON summary here")
    args = p.parse_args(argv)

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "sglang_slo.cli", "serve", "--model", args.model, "--policy", args.policy,
           "--port", str(port), "--log-level", "WARNING"] + (["--draft", args.draft] if args.draft else [])
    server = subprocess.Popen(cmd, env=env)
    summary: dict = {"policy": args.policy, "model": args.model, "draft": args.draft, "goodput_slos": args.goodput,
                     "num_prompts": args.num_prompts, "request_rate": args.request_rate, "backends": {}}
    try:
        _wait(url, server, 300)
        with tempfile.TemporaryDirectory() as tmp:
            backends = args.backends.split(",")
            run = subprocess.run(
                [sys.executable, "-m", "sglang_slo.server.bench_client", "--backends", ",".join(backends),
                 "--out-dir", tmp, "--", "--base-url", url, "--tokenizer", args.model,
                 "--dataset-name", "random-ids", "--random-input-len", str(args.input_len),
                 "--random-output-len", str(args.output_len), "--random-range-ratio", "0.5",
                 "--num-prompts", str(args.num_prompts), "--request-rate", str(args.request_rate), "--seed", "1",
                 "--disable-tqdm", "--goodput", *args.goodput.split()],
                env=env, capture_output=True, text=True, timeout=1800)
            for backend in backends:
                out = Path(tmp) / f"{backend}.jsonl"
                if not out.is_file():
                    summary["backends"][backend] = {"error": (run.stderr or run.stdout)[-2000:]}
                    continue
                res = json.loads(out.read_text().splitlines()[-1])
                summary["backends"][backend] = {k: res.get(k) for k in _KEYS}
        summary["server_attainment_by_class"] = _server_attainment(url)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    # clean = every backend ran to the end; requests the planner's admission control refused
    # (HTTP 429) count as not completed and lower goodput, they are not client errors
    ok = bool(summary["backends"]) and all("error" not in b and b["completed"] for b in summary["backends"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
