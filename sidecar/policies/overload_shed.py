"""Overload shedding: under sustained overload, reject the costliest arrivals first.

Capacity counts requests on their SLOs. When the work arriving per second (arrival rate x GPU
seconds per request, summed) exceeds what the engine can do, some requests will miss whatever
the scheduler does; missing the costliest ones frees the most GPU time per request lost. So
arrivals are admitted in ascending cost per request, a fractional knapsack on rates: with
arrivals binned by cost (log-spaced bins, EWMA rates), the threshold is where the cumulative
load of the cheaper bins fills the capacity; bins above it are rejected at arrival, the
threshold bin admits the fraction that fits (a deterministic credit counter). Below overload
the threshold is open and every arrival goes on to admission as before.

    cost of a request   prefill_seconds(new prompt tokens) + decode s/token x the expected
                        output of its SLO class (steady_cost.py: ideal batching, the cost
                        model's marginal slopes; the class's output learned from finished
                        requests, prior half its max_new_tokens)
    load                sum over bins of (arrivals/s x mean cost), GPU seconds per second
    capacity            `capacity` GPU seconds per second (the ideal-batching model is optimistic)

Hysteresis: shedding starts once the load exceeds `trigger` (>= capacity), or exceeds
`capacity` while the scheduler reports more than `distress` of its SLO requests behind their
deadlines (a sustained overload it is losing, not a burst it absorbs); then the threshold
tightens at once to where `capacity` is filled, and loosens only to where (1 - hysteresis) x
capacity is filled, so it holds still inside that band; it opens (shedding stops) when all of
the load fits in (1 - hysteresis) x capacity. Decisions are
final and taken once, at arrival: an admitted request is never dropped by this module, a later
call of an agent session whose earlier call passed is always passed (the session stays whole;
a rejected call's session is cancelled by the engine). Best-effort-class requests are passed.

Pure apart from its own estimates; O(bins) per arrival.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from protos import messages as protos
from sidecar.steady_cost import DecodeItem, decode_cost_per_token, prefill_seconds

BIN_RATIO = 2 ** 0.25
"""Cost ratio between neighbouring bins."""
BIN_BASE_S = 1e-5
"""Cost of bin 0's lower edge, GPU seconds."""


def class_key(slo: protos.Slo) -> str:
    """The SLO class a request's output length is learned under (its TPOT if unnamed)."""
    return slo.slo_class or f"tpot={slo.tpot_s:g}"


def cost_bin(cost_s: float) -> int:
    """Index of the log-spaced bin holding a request of `cost_s` GPU seconds."""
    return max(0, int(math.floor(math.log(max(cost_s, BIN_BASE_S) / BIN_BASE_S) / math.log(BIN_RATIO))))


def fill_position(bins: Sequence[tuple[int, float]], capacity: float) -> float:
    """Where cheapest-first admission fills `capacity` (GPU s/s): bins are (index, load =
    arrivals/s x mean cost), any order. Returns j + f: bins below index j are admitted whole,
    bin j a fraction f of its arrivals; inf when every bin fits."""
    merged: dict[int, float] = {}
    for j, load in bins:
        merged[j] = merged.get(j, 0.0) + load
    cum = 0.0
    for j, load in sorted(merged.items()):
        if load <= 0:
            continue
        if cum + load > capacity:
            return j + max(0.0, capacity - cum) / load
        cum += load
    return math.inf


class DecayedBins:
    """Exponentially decayed arrivals and cost per bin; rates are bias-corrected while the
    estimate is younger than its time constant (a cold start does not read as no load), but
    never over less than a third of it."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self._count: dict[int, float] = {}
        self._cost: dict[int, float] = {}
        self._t = None  # last decay time
        self._t0 = None  # first arrival

    def add(self, t: float, key: int, cost_s: float) -> None:
        self._decay(t)
        self._count[key] = self._count.get(key, 0.0) + 1.0
        self._cost[key] = self._cost.get(key, 0.0) + cost_s

    def loads(self, t: float) -> list[tuple[int, float]]:
        """(bin, GPU seconds per second arriving) per bin."""
        self._decay(t)
        norm = self._norm(t)
        return [(k, c / norm) for k, c in self._cost.items()]

    def total(self, t: float) -> float:
        return sum(load for _, load in self.loads(t))

    def _norm(self, t: float) -> float:
        # seconds of arrivals the decayed counts hold; at least a third of the window's worth,
        # so a first burst does not read as a sustained rate
        age = max((t - self._t0) if self._t0 is not None else 0.0, self.window_s / 3.0)
        return self.window_s * (1.0 - math.exp(-age / self.window_s))

    def _decay(self, t: float) -> None:
        if self._t is None:
            self._t = self._t0 = t
            return
        if t > self._t:
            f = math.exp(-(t - self._t) / self.window_s)
            for k in self._count:
                self._count[k] *= f
                self._cost[k] *= f
            self._t = t
            if len(self._count) > 64:  # bins nobody arrives in any more
                for k in [k for k, c in self._count.items() if c < 1e-6]:
                    del self._count[k], self._cost[k]


OUTPUT_EDGES = (0,) + tuple(int(8 * 2 ** (i / 2)) for i in range(29))
"""Token edges of the output-length life table (0, 8, 11, 16, ... 131072)."""


def _edge_bin(tokens: int) -> int:
    """Index i of the life-table bin [OUTPUT_EDGES[i], OUTPUT_EDGES[i + 1]) holding `tokens`."""
    lo, hi = 0, len(OUTPUT_EDGES) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if OUTPUT_EDGES[mid] <= tokens:
            lo = mid
        else:
            hi = mid
    return lo


class OutputLifeTable:
    """Expected output length of one class from finished requests *and* the ones still
    decoding (an actuarial life table: a request still running at d tokens survived every bin
    below d). Finished requests alone are biased short while long ones are in flight (the
    short ones finish first), which would under-price a class just when it floods in."""

    def __init__(self, prior_tokens: float, prior_samples: float, memory: float, cap_tokens: int = 1 << 17):
        n = len(OUTPUT_EDGES) - 1
        self.memory = memory
        self.prior_tokens = max(1.0, prior_tokens)
        self.cap_tokens = cap_tokens
        """No output is longer (the class's max_new_tokens)."""
        self._entered = [0.0] * n  # finished requests that reached bin i (decayed)
        self._died = [0.0] * n     # finished requests whose output ended in bin i (decayed)
        k = _edge_bin(int(prior_tokens))
        for i in range(k + 1):
            self._entered[i] += prior_samples
        self._died[k] += prior_samples
        self.samples = prior_samples

    def finished(self, tokens: int) -> None:
        keep = 1.0 - 1.0 / self.memory
        k = _edge_bin(tokens)
        for i in range(len(self._entered)):
            self._entered[i] = self._entered[i] * keep + (1.0 if i <= k else 0.0)
            self._died[i] *= keep
        self._died[k] += 1.0
        self.samples = self.samples * keep + 1.0

    def mean(self, running: list[int]) -> float:
        """Expected output tokens, given the decoded counts of the class's running requests."""
        n = len(self._entered)
        censored = [0.0] * n  # running requests now inside bin i
        for d in running:
            censored[_edge_bin(d)] += 1.0
        entered, above = self._entered[:], 0.0
        for i in range(n - 1, -1, -1):  # running requests that reached bin i: those now in i or above
            above += censored[i]
            entered[i] += above
        surv, total, edge = 1.0, 0.0, 0
        for i in range(n):
            exposed = entered[i] - 0.5 * censored[i]
            if exposed <= 1e-9 or edge >= self.cap_tokens:
                break
            nxt = surv * max(0.0, 1.0 - self._died[i] / exposed)
            top = min(OUTPUT_EDGES[i + 1], self.cap_tokens)
            total += 0.5 * (surv + nxt) * (top - edge)
            surv, edge = nxt, top
            if surv <= 1e-6:
                return total
        if edge < self.cap_tokens:
            # Past the data (every request there still running): the hazard per token seen so
            # far, constant, up to the cap. A falling hazard (long tails) makes this low, the
            # cap keeps it finite.
            lam = -math.log(surv) / edge if 0 < edge and surv < 1 else 1.0 / self.prior_tokens
            total += surv / lam * (1.0 - math.exp(-lam * (self.cap_tokens - edge)))
        return total


@dataclass(slots=True)
class _ClassStats:
    tpot_s: float
    table: OutputLifeTable
    output: float
    """Expected output tokens (life table, refreshed)."""
    prompt: float = 0.0
    """Mean prompt tokens (EWMA)."""
    arrivals: float = 0.0
    """Decayed arrival count (weights the decode mix)."""


@dataclass
class ShedConfig:
    capacity: float = 1.0
    """GPU seconds per second the admitted load may fill (model units: ideal batching)."""
    trigger: float = 1.0
    """Shedding starts when the arriving load exceeds this (GPU s/s, >= capacity): a scheduler
    absorbs short overloads (bursts, the drain after them) without giving anything up."""
    window_s: float = 15.0
    """Time constant of the arrival-rate estimates, seconds."""
    hysteresis: float = 0.1
    """The threshold loosens only to where (1 - hysteresis) x capacity is filled."""
    prior_samples: float = 4.0
    """Weight of the output prior (half of max_new_tokens) in finished-request samples."""
    sample_cap: float = 256.0
    """The output mean forgets old samples past this count (running mean -> EWMA)."""
    refresh_s: float = 1.0
    """Seconds between recomputations of the decode cost per token."""
    distress: float = 1.0
    """Shedding also starts once the load exceeds `capacity` while more than this share of the
    SLO requests are behind their deadlines (EWMA, `distress_window_s`); 1.0: never."""
    distress_window_s: float = 5.0
    """Time constant of the distress EWMA, seconds."""

    def __post_init__(self):
        if (self.capacity <= 0 or self.trigger < self.capacity or self.window_s <= 0
                or not 0 <= self.hysteresis < 1 or self.prior_samples <= 0 or self.sample_cap < 2
                or not 0 <= self.distress <= 1 or self.distress_window_s <= 0):
            raise ValueError(f"overload shed: bad config {self}")


@dataclass
class OverloadShed:
    """Per-arrival shed decisions (see the module docstring)."""

    config: ShedConfig = field(default_factory=ShedConfig)
    counters: dict = field(default_factory=lambda: {"shed": 0, "passed": 0})

    def __post_init__(self):
        self.reset()

    def reset(self) -> None:
        self._bins = DecayedBins(self.config.window_s)
        self._classes: dict[str, _ClassStats] = {}
        self._queued: list[protos.RequestArrived] = []
        self._live: dict[str, str] = {}  # rid -> class, passed and not finished
        self._sessions: set[str] = set()  # sessions with a passed call
        self._position = math.inf  # threshold: bin index + admitted fraction of that bin
        self._credit = 0.0
        self._per_token = None  # decode GPU seconds per output token
        self._refreshed = -math.inf
        self._mix_t = None  # last arrival folded into the class mix
        self._distress = 0.0  # EWMA of the share of SLO requests behind their deadlines
        self._distress_t = None

    # ---- events ---------------------------------------------------------------------------

    def arrived(self, msg: protos.RequestArrived) -> None:
        self._queued.append(msg)

    def finished(self, msg: protos.RequestFinished) -> None:
        c = self._live.pop(msg.rid, None)
        if c is None or msg.reason not in (protos.FinishReason.STOP, protos.FinishReason.LENGTH):
            return
        self._classes[c].table.finished(msg.decoded)

    # ---- decisions ------------------------------------------------------------------------

    def decide(self, cost, acceptance, max_depth: int, now_s: float, running=(), distress: float = 0.0) -> list[str]:
        """Rids of the arrivals since the last call to reject (each arrival is decided once).
        running: the requests decoding now (`.slo`, `.decoded`; for the output estimates).
        distress: share of the SLO requests the scheduler sees behind their deadlines now."""
        self._observe_distress(now_s, distress)
        if not self._queued:
            return []
        cfg = self.config
        out = []
        queued, self._queued = self._queued, []
        for msg in queued:
            cls = self._class_of(msg)
            if now_s - self._refreshed >= cfg.refresh_s or self._per_token is None:
                self._refresh(cost, acceptance, max_depth, now_s, running)
            s = self._classes[cls]
            kappa = prefill_seconds(cost, max(0, msg.prompt_tokens - msg.cached_prefix_tokens)) + \
                self._per_token * s.output
            key = cost_bin(kappa)
            self._bins.add(msg.arrival_s, key, kappa)
            if msg.slo.best_effort or (msg.session_id and msg.session_id in self._sessions) or self._admit(key, now_s):
                self._live[msg.rid] = cls
                if msg.session_id:
                    self._sessions.add(msg.session_id)
                self.counters["passed"] += 1
            else:
                out.append(msg.rid)
                self.counters["shed"] += 1
        if len(self._sessions) > 65536:  # bounded: old sessions forget (their calls are long done)
            self._sessions.clear()
        if len(self._live) > 1 << 20:
            self._live.clear()
        return out

    def threshold(self, now_s: float) -> float:
        """Current threshold position (bin index + admitted fraction; inf = admit all)."""
        self._update(now_s)
        return self._position

    def _admit(self, key: int, now_s: float) -> bool:
        self._update(now_s)
        j = math.floor(self._position) if self._position < math.inf else math.inf
        if key < j:
            return True
        if key > j:
            return False
        self._credit += self._position - j
        if self._credit >= 1.0:
            self._credit -= 1.0
            return True
        return False

    def _observe_distress(self, now_s: float, x: float) -> None:
        if self._distress_t is not None and now_s > self._distress_t:
            f = math.exp(-(now_s - self._distress_t) / self.config.distress_window_s)
            self._distress = f * self._distress + (1.0 - f) * x
        if self._distress_t is None or now_s > self._distress_t:
            self._distress_t = now_s

    def _update(self, now_s: float) -> None:
        loads = self._bins.loads(now_s)
        cfg = self.config
        cap = cfg.capacity
        if self._position == math.inf:
            total = sum(load for _, load in loads)
            # not shedding yet: start past the trigger, or past capacity once requests fall behind
            if total <= cfg.trigger and (total <= cap or self._distress <= cfg.distress):
                return
        tight = fill_position(loads, cap)
        if tight < self._position:
            self._position = tight
        else:
            loose = fill_position(loads, cap * (1.0 - self.config.hysteresis))
            if loose > self._position:
                self._position = loose

    def _class_of(self, msg: protos.RequestArrived) -> str:
        cls = class_key(msg.slo)
        s = self._classes.get(cls)
        if s is None:
            prior = 0.5 * min(msg.max_new_tokens, 8192)
            table = OutputLifeTable(prior, self.config.prior_samples, self.config.sample_cap, msg.max_new_tokens)
            s = self._classes[cls] = _ClassStats(msg.slo.tpot_s, table, table.mean([]), float(msg.prompt_tokens))
        # arrivals weight the decode mix; decayed with the same time constant as the bins
        if self._mix_t is not None and msg.arrival_s > self._mix_t:
            f = math.exp(-(msg.arrival_s - self._mix_t) / self.config.window_s)
            for c in self._classes.values():
                c.arrivals *= f
        if self._mix_t is None or msg.arrival_s > self._mix_t:
            self._mix_t = msg.arrival_s
        s.arrivals += 1.0
        s.prompt += (msg.prompt_tokens - s.prompt) / 32.0
        s.table.cap_tokens = max(s.table.cap_tokens, msg.max_new_tokens)
        return cls

    def _refresh(self, cost, acceptance, max_depth: int, now_s: float, running) -> None:
        """Output estimates per class, and decode GPU seconds per output token of the arriving
        mix (classes by arrival rate)."""
        by_class: dict[str, list[int]] = {c: [] for c in self._classes}
        for r in running:
            c = class_key(r.slo)
            if c in by_class:
                by_class[c].append(r.decoded)
        for c, s in self._classes.items():
            s.output = s.table.mean(by_class[c])
        items = [DecodeItem(acceptance.peek_class_alphas(c), s.output, s.prompt, s.tpot_s, c, s.arrivals)
                 for c, s in self._classes.items() if s.arrivals > 1e-3 and s.output > 0]
        per_token, _ = decode_cost_per_token(cost, items, max_depth)
        if math.isfinite(per_token):
            self._per_token = per_token
        elif self._per_token is None:
            self._per_token = 0.0  # no batch keeps the pace: decode costs unknown, prefill alone ranks
        self._refreshed = now_s


__all__ = ["BIN_RATIO", "DecayedBins", "OverloadShed", "ShedConfig", "cost_bin", "fill_position"]
