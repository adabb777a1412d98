"""Short table of what `scripts/gpu_check.sh` wrote: python scripts/gpu_check_summary.py OUT_DIR."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(path: Path) -> dict | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    for candidate in (text, text.splitlines()[-1] if text else ""):  # one JSON object, or the last line
        try:
            return json.loads(candidate)
        except ValueError:
            pass
    return None


def bench_rows(name: str, b: dict | None) -> list[str]:
    if not b:
        return [f"{name}: missing"]
    rows = [f"{name}: {b.get('gpu', b.get('device'))} {b.get('dtype')} spec depth {b['spec']['depth']}"
            f" | single plain {b['single_stream']['tokens_per_s']} tok/s, spec "
            f"{b.get('single_stream_spec', {}).get('tokens_per_s')} (x{b.get('spec_speedup')}, "
            f"accepted/verify {b.get('single_stream_spec', {}).get('mean_accepted_per_verify')})"]
    for c, r in b.get("concurrent", {}).items():
        rows.append(f"  c={c:>3}: plain {r['plain']['tokens_per_s']:>8} tok/s ({r['plain']['ms_per_iteration']} ms/it)"
                    f"  spec {r.get('spec', {}).get('tokens_per_s', '-'):>8} ({r.get('spec', {}).get('ms_per_iteration', '-')}"
                    f" ms/it)  x{r.get('spec_speedup', '-')}; full batch {r['plain'].get('full_batch_tokens_per_s')}"
                    f" vs {r.get('spec', {}).get('full_batch_tokens_per_s')} x{r.get('spec', {}).get('full_batch_speedup')}")
    for s in b.get("spec_sweep", []):
        rows.append(f"  sweep d{s['depth']}w{s['width']}: x{s['speedup']} (accepted/verify {s['mean_accepted_per_verify']})")
    return rows


def main(out_dir: str) -> int:
    d = Path(out_dir)
    lines = ["---- gpu_check summary ----"]
    log = (d / "gpu_check.log").read_text() if (d / "gpu_check.log").is_file() else ""
    lines += [ln for ln in log.splitlines() if ln.startswith("=== ") and ": rc=" in ln]
    lines += [ln for ln in log.splitlines() if (" passed" in ln or " failed" in ln or " error" in ln or " skipped" in ln)
              and ln.strip()[:1].isdigit()]
    sdpa = [ln for ln in log.splitlines() if ln.startswith('{"torch"')]
    if sdpa:
        lines.append("sdpa ms/call over 20 new key lengths: " + sdpa[-1])
    for name in ("bench_fp32", "bench_bf16", "bench_fp32_depth4"):
        lines += bench_rows(name, load(d / f"{name}.json"))
    agree = load(d / "agreement.json")
    if agree:
        for dtype in ("float32", "bfloat16"):
            if dtype in agree:
                lines.append(f"agreement {dtype}: " + ", ".join(
                    f"{k} {v['identical']}/{v['requests']}" for k, v in agree[dtype].items()))
    planner = load(d / "bench_planner.json")
    if planner:
        lines.append(f"bench-planner ({planner.get('cpus')} cpus, load {planner.get('loadavg_start')}): plan p50/p99 ms")
        for pol, sizes in planner.get("plan_latency", {}).items():
            lines.append(f"  {pol}: " + ", ".join(f"{n}: {v['plan']['p50_ms']}/{v['plan']['p99_ms']}"
                                                for n, v in sizes.items()))
        for n, modes in planner.get("zmq_roundtrip", {}).items():
            lines.append(f"  zmq round trip @{n}: " + ", ".join(
                f"{m} p50/p99 {v['roundtrip']['p50_ms']}/{v['roundtrip']['p99_ms']} ms"
                for m, v in modes.items() if isinstance(v, dict) and "roundtrip" in v))
    prof = load(d / "profile.json")
    if prof:
        lines.append(f"profile: held-out MAPE {prof['held_out']['mape']} (online {prof['held_out_online']['mape']}),"
                     f" train {prof['train']['mape']}, {prof['seconds']} s")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "results/gpu-check"))
