"""Speculative acceptance: per-position conditional acceptance alpha_j, per class and per request.

alpha_j = P(draft token j accepted | tokens 1..j-1 accepted). For a chain of depth d the
expected accepted draft tokens (bonus excluded) are sum_{k=1..d} prod_{j<=k} alpha_j.

Estimates, from coarse to fine:
- static prior per SLO class (hardware profile `acceptance:` or the calibration table in
  reference/workloads-and-calibration.md section 3.1),
- per-class online counts shrunk toward that prior (strength `class_strength` trials),
- per-request online counts shrunk toward the class estimate (strength `request_strength`).
Counts decay geometrically (`decay` per observation) so estimates track drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protos import messages as protos

MAX_POSITIONS = 16  # alphas beyond this position repeat the last one
_CLASS_EPOCH = 32  # class observations between refreshes of the class estimate

# Calibration table, section 3.1 (conditional alpha_1..alpha_6+, chain drafts).
EAGLE3_STRONG = [0.85, 0.82, 0.80, 0.78, 0.76, 0.75]  # EAGLE-3, code/math, T=0
EAGLE2_CHAT = [0.80, 0.76, 0.74, 0.72, 0.71, 0.70]  # EAGLE-2/1 on chat, T=0
EAGLE3_T1 = [0.70, 0.66, 0.64, 0.62, 0.60, 0.60]  # public EAGLE-3 checkpoint, T=1
SMALL_DRAFT = [0.60, 0.55, 0.52, 0.50, 0.50, 0.50]  # independent 68M-1B draft on chat
REASONING_T1 = [0.58, 0.53, 0.52, 0.50, 0.50, 0.50]  # gpt-oss + EAGLE-3, T=1


def _shift(alphas: list[float], delta: float) -> list[float]:
    return [min(0.97, max(0.0, a + delta)) for a in alphas]


# Default priors per class for an EAGLE-3-class drafter (task adjustments of section 3.1:
# code +0.05 over chat, summarization +0.03, reasoning at T=1 its own row).
DEFAULT_PRIORS: dict[str, list[float]] = {
    "default": EAGLE2_CHAT,
    "chat": EAGLE2_CHAT,
    "chatbot": EAGLE2_CHAT,
    "coding": EAGLE3_STRONG,
    "code": EAGLE3_STRONG,
    "summarization": _shift(EAGLE2_CHAT, 0.03),
    "tool-call": EAGLE2_CHAT,
    "tool_call": EAGLE2_CHAT,
    "reasoning": REASONING_T1,
}


def chain_expected(alphas: list[float], depth: int) -> float:
    """sum_{k=1..depth} prod_{j<=k} alpha_j (alphas beyond the list repeat the last)."""
    total, run = 0.0, 1.0
    last = alphas[-1] if alphas else 0.0
    for j in range(depth):
        run *= alphas[j] if j < len(alphas) else last
        total += run
    return total


def widen(alpha: float, width: int) -> float:
    """Acceptance at one tree level with `width` sibling candidates.

    Siblings are correlated with the top-1 candidate, so each extra sibling only removes part
    of the remaining rejection mass: 1 - (1 - alpha)^(1 + 0.5 (width - 1)). Heuristic; the
    engine's per-iteration path probabilities refine it.
    """
    if width <= 1:
        return alpha
    return 1.0 - (1.0 - alpha) ** (1.0 + 0.5 * (width - 1))


def _width_exponent(width: float) -> float:
    return 1.0 + 0.5 * (width - 1.0)  # see widen()


@dataclass(slots=True)
class _Counts:
    """Decayed accepted/trial counts per draft position (index 0 = position 1).

    Decay is lazy: stored counts are in units that grow by 1/decay per observation (real
    count = stored / unit), so an observation touches only the positions it drafted.
    Tree verifies accept per level with the widened rate; `wexp` tracks the mean widen
    exponent of the observations so estimates can be mapped back to chain alphas."""

    acc: list[float] = field(default_factory=lambda: [0.0] * MAX_POSITIONS)
    trials: list[float] = field(default_factory=lambda: [0.0] * MAX_POSITIONS)
    unit: float = 1.0
    wexp: float = 1.0

    def add(self, accepted: int, depth: int, decay: float, width: float = 1.0, count: int = 1) -> None:
        """`count` identical outcomes (a batch is weighted as if observed together)."""
        if decay < 1.0:
            self.unit /= decay if count == 1 else decay**count
            if self.unit > 1e100:  # renormalise long before overflow
                self.rescale()
        acc, trials = self.acc, self.trials  # after rescale(), which replaces both lists
        u = self.unit * count
        w = u / (trials[0] + u)  # running mean (an EWMA once decay bounds the counts)
        self.wexp += w * (_width_exponent(width) - self.wexp)
        if depth > MAX_POSITIONS:
            depth = MAX_POSITIONS
        if accepted > depth:
            accepted = depth
        # Positions 1..accepted were accepted; position accepted+1 (if drafted) was rejected.
        for j in range(accepted + 1 if accepted < depth else depth):
            trials[j] += u
        for j in range(accepted):
            acc[j] += u

    def rescale(self) -> None:
        u = self.unit
        self.acc = [a / u for a in self.acc]
        self.trials = [t / u for t in self.trials]
        self.unit = 1.0


@dataclass(slots=True)
class _RequestEstimate:
    slo_class: str
    counts: _Counts = field(default_factory=_Counts)
    cache: list[float] | None = None  # alphas over MAX_POSITIONS, None = stale
    epoch: int = -1  # class epoch the cache was computed against


class AcceptanceModel:
    """Per-position acceptance with per-class priors and per-request online estimates."""

    def __init__(
        self,
        priors: dict[str, list[float]] | None = None,
        class_strength: float = 64.0,
        request_strength: float = 8.0,
        decay: float = 0.98,
        class_decay: float = 0.999,
    ):
        """priors: per class alphas ('default' used for unknown classes); strengths are in
        pseudo-trials per position; decay multiplies old counts at every observation."""
        merged = dict(DEFAULT_PRIORS)
        merged.update(priors or {})
        self.priors = {k: _pad(v) for k, v in merged.items()}
        self.class_strength = class_strength
        self.request_strength = request_strength
        self.decay = decay
        self.class_decay = class_decay
        self._classes: dict[str, _Counts] = {}
        self._class_cache: dict[str, list[float]] = {}
        self._class_updates: dict[str, int] = {}
        self._class_pending: dict[str, dict[tuple[int, int, float], int]] = {}
        self._requests: dict[str, _RequestEstimate] = {}

    # ---- estimates --------------------------------------------------------------------

    def class_alphas(self, slo_class: str) -> list[float]:
        """Current per-position alphas of a class (prior shrunk by the class's own counts)."""
        cached = self._class_cache.get(slo_class)
        if cached is not None:
            return cached
        prior = self.priors.get(slo_class) or self.priors["default"]
        self._flush_class(slo_class)
        counts = self._classes.get(slo_class)
        out = prior if counts is None else _shrink(counts, prior, self.class_strength)
        self._class_cache[slo_class] = out
        return out

    def peek_class_alphas(self, slo_class: str) -> list[float]:
        """class_alphas without applying the pending outcomes or caching: a read that changes
        nothing (the class counts' batching, and so every later estimate, stays as it was)."""
        cached = self._class_cache.get(slo_class)
        if cached is not None:
            return cached
        prior = self.priors.get(slo_class) or self.priors["default"]
        counts = self._classes.get(slo_class)
        return prior if counts is None else _shrink(counts, prior, self.class_strength)

    def alphas(self, rid: str, depth: int) -> list[float]:
        """Per-position conditional acceptance alpha_1..alpha_depth for a request."""
        est = self._requests.get(rid)
        if est is not None and depth < MAX_POSITIONS and (
                est.cache is None or est.epoch != self._class_updates.get(est.slo_class, 0) // _CLASS_EPOCH):
            # Stale: shrink only the positions asked for (the planner re-reads ~1/16 of its rows a
            # plan, each observed since); same values as the full row, which is left uncached.
            return _shrink(est.counts, self.class_alphas(est.slo_class), self.request_strength, depth)
        full = self._request_alphas(rid, "")
        if depth <= MAX_POSITIONS:
            return full[:depth]
        return full + [full[-1]] * (depth - MAX_POSITIONS)

    def expected_accepted(self, rid: str, depth: int, width: int = 1) -> float:
        """Expected accepted draft tokens (bonus excluded) for a chain/tree of that shape."""
        if depth <= 0:
            return 0.0
        alphas = self._request_alphas(rid, "")
        if width > 1:
            alphas = [widen(a, width) for a in alphas]
        return chain_expected(alphas, depth)

    def expected_committed(self, rid: str, depth: int, width: int = 1) -> float:
        """Expected committed tokens per verify: accepted + the bonus/correction token."""
        return 1.0 + self.expected_accepted(rid, depth, width)

    def _request_alphas(self, rid: str, slo_class: str) -> list[float]:
        est = self._requests.get(rid)
        if est is None:
            return self.class_alphas(slo_class)
        epoch = self._class_updates.get(est.slo_class, 0) // _CLASS_EPOCH
        if est.cache is None or est.epoch != epoch:
            est.cache = _shrink(est.counts, self.class_alphas(est.slo_class), self.request_strength)
            est.epoch = epoch
        return est.cache

    # ---- updates ----------------------------------------------------------------------

    def register(self, rid: str, slo_class: str) -> None:
        """Start tracking a request (called on arrival; observe() also registers)."""
        if rid not in self._requests:
            self._requests[rid] = _RequestEstimate(slo_class)

    def observe(self, rid: str, slo_class: str, progress: protos.RequestProgress) -> None:
        """Account one iteration's verify outcome (`accepted` of a path of `depth`)."""
        if progress.depth <= 0:
            return
        est = self._requests.get(rid)
        if est is None:
            est = self._requests[rid] = _RequestEstimate(slo_class)
        # Mean nodes per level of the verified tree (1 for chains).
        width = progress.verified / progress.depth if progress.verified > progress.depth else 1.0
        est.counts.add(progress.accepted, progress.depth, self.decay, width)
        est.cache = None
        # Class counts take outcomes in batches: one dict increment here, applied (flushed)
        # when the class estimate is next read.
        pending = self._class_pending.get(est.slo_class)
        if pending is None:
            pending = self._class_pending[est.slo_class] = {}
        key = (progress.accepted, progress.depth, round(width * 4) / 4)
        pending[key] = pending.get(key, 0) + 1
        # Requests shrink toward the class estimate, which just moved; their cached alphas
        # refresh lazily once per _CLASS_EPOCH class updates (keeps plan() O(n), not O(n*16)).
        n = self._class_updates[est.slo_class] = self._class_updates.get(est.slo_class, 0) + 1
        if n % _CLASS_EPOCH == 0:
            self._class_cache.pop(est.slo_class, None)

    def _flush_class(self, slo_class: str) -> None:
        pending = self._class_pending.pop(slo_class, None)
        if not pending:
            return
        cls = self._classes.get(slo_class)
        if cls is None:
            cls = self._classes[slo_class] = _Counts()
        for (accepted, depth, width), count in pending.items():
            cls.add(accepted, depth, self.class_decay, width, count)

    def forget(self, rid: str) -> None:
        """Drop a finished request's estimate (class counts keep what it taught)."""
        self._requests.pop(rid, None)

    def clear_requests(self) -> None:
        self._requests.clear()


def _pad(alphas: list[float]) -> list[float]:
    alphas = [float(a) for a in alphas] or [0.0]
    return (alphas + [alphas[-1]] * MAX_POSITIONS)[:MAX_POSITIONS]


def _shrink(counts: _Counts, prior: list[float], strength: float, positions: int = MAX_POSITIONS) -> list[float]:
    """Posterior-mean chain alphas of the first `positions` positions: counts shrunk toward the
    prior (in the observations' widened space when they came from trees, then mapped back)."""
    e, s = counts.wexp, strength * counts.unit  # strength in the counts' stored units
    if positions < len(prior):
        prior = prior[:positions]  # zip below stops there
    if e <= 1.0001:
        return [(a + s * p) / (t + s) for a, t, p in zip(counts.acc, counts.trials, prior)]
    inv = 1.0 / e
    return [1.0 - (1.0 - (a + s * (1.0 - (1.0 - p) ** e)) / (t + s)) ** inv  # tree level -> chain alpha
            for a, t, p in zip(counts.acc, counts.trials, prior)]
