"""How much capacity any policy could have: the work a workload carries, against the engine.

Capacity counts requests (>= 90% of them on their SLOs), so it has two ceilings a scheduler
cannot move: the GPU time the arriving work needs, and the fact that giving up a class frees
at most its share of the work while costing its share of the requests.

    bound       arrivals/s at which the trace's work fills the GPU with ideal batching: every
                prompt token at the cost model's marginal (above-knee) slope plus its causal
                attention, every decode in the largest batch whose iteration keeps the tightest
                class's TPOT (mean E_c(k) * tpot_c) at the best chain depth k (one for all; batch
                composition by each request's share of decode iterations). No prefill/decode
                interference, bursts, KV limits or queueing: an optimistic steady-state
                ceiling (the costs: sidecar/steady_cost.py, which slo_unified's overload
                shedding prices arrivals with). Also without one class (default: the largest share of output tokens),
                and serving only the cheapest `target` share of the requests (the most a
                policy that counts requests on SLO could reach, by giving up the costliest).
    without     the trace without that class (later calls of a dropped agent loop go too),
                simulated per policy: overall attainment counting the dropped requests as
                misses, i.e. what the policy reaches by giving up that class.

    python -m eval.ceiling --workload mixed --hardware configs/hardware/h100-llama3.1-8b-eagle3.yaml \\
        --policies fcfs,slo_unified --rates 18,27,36
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import msgspec

from eval.compare import make_workload
from eval.metrics import summarize
from eval.simulator import simulate
from eval.workloads import GenRequest, Workload
from sidecar.cost_model import CostModel, load_profile
from sidecar.steady_cost import DecodeItem, prefill_seconds
from sidecar.steady_cost import decode_cost_per_token as steady_decode_cost


def work_shares(w: Workload) -> dict[str, dict[str, float]]:
    """Per SLO class: its share of the requests, of the output tokens and of the prompt tokens
    to prefill (not prefix-cacheable)."""
    tally = defaultdict(lambda: [0, 0, 0])
    for r in w.requests:
        t = tally[r.slo.slo_class]
        t[0] += 1
        t[1] += r.output_tokens
        t[2] += r.prompt_tokens - r.prefix_tokens
    totals = [sum(t[i] for t in tally.values()) or 1 for i in range(3)]
    return {c: {"requests": t[0] / totals[0], "output_tokens": t[1] / totals[1], "prefill_tokens": t[2] / totals[2]}
            for c, t in sorted(tally.items())}


def drop_class(w: Workload, slo_class: str) -> tuple[Workload, int]:
    """The trace without `slo_class`'s requests (and the later calls of any agent loop that
    loses a call); returns it and how many requests went."""
    return drop(w, {r.rid for r in w.requests if r.slo.slo_class == slo_class})


def drop_costliest(w: Workload, share: float, hardware: str | Path) -> tuple[Workload, int]:
    """The trace without its costliest requests (prefill + output tokens at the bound's costs),
    as many as make up `share` of the requests (with their loops' later calls): what a policy
    maximising the count of requests on SLO would give up."""
    profile = load_profile(hardware)
    per_token, _ = decode_cost_per_token(profile.cost, w.requests, profile.engine.max_depth)
    by_cost = sorted(w.requests, key=lambda r: prefill_cost(profile.cost, [r]) + per_token * r.output_tokens)
    later = _later_calls(w)
    gone: set[str] = set()
    while by_cost and len(gone) < share * len(w.requests):
        _add_with_loops(by_cost.pop().rid, gone, later)
    return drop(w, gone)


def drop(w: Workload, rids: set[str]) -> tuple[Workload, int]:
    """The trace without `rids` and the later calls of their agent loops; and how many went."""
    later, gone = _later_calls(w), set()
    for rid in rids:
        _add_with_loops(rid, gone, later)
    return msgspec.structs.replace(w, requests=[r for r in w.requests if r.rid not in gone]), len(gone)


def _later_calls(w: Workload) -> dict[str, list[str]]:
    later = defaultdict(list)
    for r in w.requests:
        if r.after_rid:
            later[r.after_rid].append(r.rid)
    return later


def _add_with_loops(rid: str, gone: set[str], later: dict[str, list[str]]) -> None:
    stack = [rid]
    while stack:
        x = stack.pop()
        if x not in gone:
            gone.add(x)
            stack.extend(later.get(x, ()))


def arrivals(requests: list[GenRequest]) -> int:
    """Arrivals as a workload's `rate` counts them: an agent loop is one (its first call)."""
    return sum(not r.after_rid for r in requests)


def decode_items(requests: list[GenRequest]) -> list[DecodeItem]:
    """The requests as the steady-state decode mix (sidecar/steady_cost.py)."""
    return [DecodeItem(r.alphas, r.output_tokens, r.prompt_tokens, r.slo.tpot_s, r.slo.slo_class) for r in requests]


def decode_cost_per_token(cost: CostModel, requests: list[GenRequest], max_depth: int) -> tuple[float, dict]:
    """GPU seconds per output token of the requests' decodes with ideal batching (see the
    module docstring), and the batch that achieves it."""
    return steady_decode_cost(cost, decode_items(requests), max_depth)


def prefill_cost(cost: CostModel, requests: list[GenRequest]) -> float:
    """GPU seconds of the requests' prompts (not prefix-cached) at the marginal slope, + causal attention."""
    return sum(prefill_seconds(cost, r.prompt_tokens - r.prefix_tokens) for r in requests)


def capacity_bound(requests: list[GenRequest], n_arrivals: int, hardware: str | Path) -> dict:
    """Arrivals/s at which the work of `requests`, brought by `n_arrivals` arrivals, fills the
    GPU with ideal batching (optimistic)."""
    profile = load_profile(hardware)
    per_token, batch = decode_cost_per_token(profile.cost, requests, profile.engine.max_depth)
    output = sum(r.output_tokens for r in requests)
    gpu_s = prefill_cost(profile.cost, requests) + per_token * output
    per_arrival = gpu_s / max(n_arrivals, 1)
    return {"rate": round(1.0 / per_arrival, 2), "gpu_ms_per_arrival": round(per_arrival * 1e3, 2),
            "prefill_share": round(1 - per_token * output / gpu_s, 3), "decode": batch}


def ceiling(workload: str, hardware: str | Path, policies: list[str], rates: list[float], *,
            duration_s: float = 60.0, seed: int = 0, give_up: str | None = None, target: float = 0.9) -> dict:
    """See the module docstring; JSON-ready. The bound comes from a long trace (600 s at the
    highest rate) so its mix is the workload's, not one draw's."""
    long = make_workload(workload, hardware, rate=max(rates), duration_s=600.0, seed=seed)
    shares = work_shares(long)
    give_up = give_up or max(shares, key=lambda c: shares[c]["output_tokens"])
    rest, _ = drop_class(long, give_up)
    out = {"workload": workload, "hardware": str(hardware), "duration_s": duration_s, "seed": seed,
           "work_shares": shares, "given_up_class": give_up,
           "bound": capacity_bound(long.requests, arrivals(long.requests), hardware),
           # per arrival of the whole trace: the rate at which the rest alone fills the GPU
           f"bound_without_{give_up}": capacity_bound(rest.requests, arrivals(long.requests), hardware)
           | {"requests_given_up": round(1 - len(rest.requests) / len(long.requests), 4)},
           # the best a policy counting requests can do: give up the costliest (1 - target)
           "bound_serving_cheapest": capacity_bound(drop_costliest(long, 1 - target, hardware)[0].requests,
                                                    arrivals(long.requests), hardware) | {"share": target},
           "rates": {}}
    for rate in rates:
        w = make_workload(workload, hardware, rate=rate, duration_s=duration_s, seed=seed)
        rest, dropped = drop_class(w, give_up)
        out["rates"][str(rate)] = {p: {
            "attainment_slos_serve": round(_attainment(w, hardware, p, seed), 4),
            f"attainment_without_{give_up}": round(_attainment(rest, hardware, p, seed) * len(rest.requests)
                                                   / len(w.requests), 4),
            f"{give_up}_requests_given_up": dropped} for p in policies}
    return out


def _attainment(w: Workload, hardware: str | Path, policy: str, seed: int) -> float:
    """Overall SLOs-Serve attainment of `policy` on the simulated trace."""
    return summarize(simulate(w, hardware, policy, seed=seed).records, w.duration_s)["overall"]["attainment_slos_serve"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.ceiling", description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="mixed")
    ap.add_argument("--hardware", default="configs/hardware/h100-llama3.1-8b-eagle3.yaml")
    ap.add_argument("--policies", default="fcfs,slo_unified")
    ap.add_argument("--rates", default="18,27,36", help="comma-separated arrivals/s")
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--give-up", default=None, help="class to drop (default: largest output-token share)")
    ap.add_argument("--json", action="store_true", help="(the output is always JSON)")
    a = ap.parse_args(argv)
    try:
        rates = [float(x) for x in a.rates.split(",")]
    except ValueError:
        ap.error(f"--rates: not a comma-separated list of numbers: {a.rates!r}")
    res = ceiling(a.workload, a.hardware, a.policies.split(","), rates, duration_s=a.duration, seed=a.seed,
                  give_up=a.give_up)
    json.dump(res, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
