"""Iteration-time model of an engine: how long one forward (draft steps + verify) takes.

Form (roofline-ish, piecewise linear in the batch's token count n = prefill + verify tokens):

    t = scale * ( base_s
                  + k_tok_s * n + k_knee_s * max(0, n - knee_tokens)    # GEMMs: flat, then compute-bound
                  + k_ctx_s * context_tokens                           # KV reads (attention)
                  + k_pf2_s * prefill_tokens**2                        # causal prefill attention
                  + draft_steps * d_step_s + k_dtok_s * draft_tokens   # drafter
                  + k_ver_s * verify_tokens                            # per-decode-token overheads
                  + k_req_s * requests + k_spec_s * spec_requests      # per-request overheads
                  + k_tree_s * tree_tokens )                           # tree-shaped drafting

`requests` are the sequences in the forward (prefill chunks + decodes), `spec_requests` the
decodes that verified draft tokens, `tree_tokens` the draft tokens of requests whose verified
tree is wider than a chain (tree draft steps build per-node masks, chain steps do not). All
three come from an IterationReport's progress (`report_features`); callers that do not pass
them get estimates from the token counts (decodes = verify - draft tokens, one prefill chunk).

All coefficients are seconds (per token, per token^2, per step). `fit()` recovers them by
least squares (grid search over the knee); `observe()` refits online: a robust EWMA scale
factor on measured/predicted time, plus a windowed least-squares refit that replaces the
coefficients only when it predicts the window better.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import yaml

from protos import messages as protos

_INF_TOKENS = 1 << 30  # "no limit" answer of max_tokens_within when tokens cost nothing


@dataclass(frozen=True)
class EngineLimits:
    """What an engine can execute (from `EngineHello`, or a hardware profile before it)."""

    kv_capacity_tokens: int
    """Total KV cache slots of the target model (tokens)."""
    max_batch_tokens: int
    """Most tokens one forward may carry (prefill + verify)."""
    max_depth: int
    """Deepest draft the engine can run (0 = no speculation)."""
    max_width: int
    """Widest beam per tree level (1 = chains only)."""
    depth_tiers: tuple[int, ...] = ()
    """If non-empty, the only speculation depths the engine can run."""
    kv_block_tokens: int = 16
    """Tokens per KV block (allocation granularity)."""

    def __post_init__(self):
        if self.kv_capacity_tokens <= 0 or self.max_batch_tokens <= 0:
            raise ValueError("kv_capacity_tokens and max_batch_tokens must be positive")
        if self.max_depth < 0 or self.max_width < 1 or self.kv_block_tokens < 1:
            raise ValueError("need max_depth >= 0, max_width >= 1, kv_block_tokens >= 1")
        object.__setattr__(self, "depth_tiers", tuple(sorted(int(d) for d in self.depth_tiers)))

    @classmethod
    def from_hello(cls, hello: protos.EngineHello) -> "EngineLimits":
        return cls(
            kv_capacity_tokens=hello.kv_capacity_tokens,
            max_batch_tokens=hello.max_batch_tokens,
            max_depth=hello.max_depth,
            max_width=max(1, hello.max_width),
            depth_tiers=tuple(hello.depth_tiers),
            kv_block_tokens=max(1, hello.kv_block_tokens),
        )


# Names of the coefficients, in feature order (knee_tokens is not a linear coefficient).
COEFS = ("base_s", "k_tok_s", "k_knee_s", "k_ctx_s", "k_pf2_s", "d_step_s", "k_dtok_s", "k_ver_s",
         "k_req_s", "k_spec_s", "k_tree_s")
_REQUEST_COEFS = ("k_req_s", "k_spec_s", "k_tree_s")  # need request counts (9-column rows)


@dataclass
class CostModel:
    """Predicts one engine iteration's wall time (seconds); see the module docstring."""

    base_s: float = 0.0
    """Fixed time per iteration: weight reads + launch/scheduler overhead, seconds."""
    k_tok_s: float = 0.0
    """Seconds per batch token below the knee (memory-bound slope)."""
    k_knee_s: float = 0.0
    """Extra seconds per batch token above the knee (compute-bound slope minus k_tok_s)."""
    knee_tokens: int = 0
    """Batch size (tokens) where GEMMs turn compute-bound."""
    k_ctx_s: float = 0.0
    """Seconds per KV-context token attended (summed over the batch's requests)."""
    k_pf2_s: float = 0.0
    """Seconds per prefill_tokens^2 (causal attention inside the prefill chunk)."""
    d_step_s: float = 0.0
    """Seconds per sequential draft step (fixed part of one drafter forward)."""
    k_dtok_s: float = 0.0
    """Seconds per draft token (summed over all draft steps)."""
    k_ver_s: float = 0.0
    """Extra seconds per verify/decode token over a prefill token (per-request work: sampling,
    tree masks, bookkeeping; large on CPU engines, ~0 on GPU profiles)."""
    k_req_s: float = 0.0
    """Seconds per sequence in the forward (prefill chunk or decode): per-request scheduling,
    metadata and report work (CPU engines)."""
    k_spec_s: float = 0.0
    """Extra seconds per speculating request (tree selection, verification walk, KV commit)."""
    k_tree_s: float = 0.0
    """Extra seconds per draft token of a tree wider than a chain (per-node tree masks)."""
    scale: float = 1.0
    """Online multiplicative correction (measured / predicted, EWMA)."""
    ewma: float = 0.05
    """Weight of one new observation in the scale EWMA."""
    window: int = 512
    """Observations kept for the windowed refit."""
    refit_every: int = 128
    """Refit from the window after this many new observations (0 = never)."""
    _samples: deque = field(default_factory=lambda: deque(maxlen=512), repr=False)
    _since_refit: int = field(default=0, repr=False)
    _refit_job: Iterator[None] | None = field(default=None, init=False, repr=False, compare=False)
    """A deferred refit in progress (`refit_step`): one knee candidate per step."""

    def __post_init__(self):
        if self.window != self._samples.maxlen:
            self._samples = deque(self._samples, maxlen=self.window)

    # ---- prediction -------------------------------------------------------------------

    def iteration_time(
        self,
        prefill_tokens: int,
        verify_tokens: int,
        draft_steps: int,
        context_tokens: int,
        draft_tokens: int = 0,
        requests: int | None = None,
        spec_requests: int | None = None,
        tree_tokens: int = 0,
    ) -> float:
        """Seconds for one engine iteration: `draft_steps` drafter steps then one target forward.

        `requests` / `spec_requests` default to estimates from the token counts
        (`estimate_requests`)."""
        n = prefill_tokens + verify_tokens
        over = n - self.knee_tokens
        if requests is None or spec_requests is None:
            est_req, est_spec = estimate_requests(prefill_tokens, verify_tokens, draft_steps, draft_tokens)
            requests = est_req if requests is None else requests
            spec_requests = est_spec if spec_requests is None else spec_requests
        t = (
            self.base_s
            + self.k_tok_s * n
            + (self.k_knee_s * over if over > 0 else 0.0)
            + self.k_ctx_s * context_tokens
            + self.k_pf2_s * prefill_tokens * prefill_tokens
            + self.d_step_s * draft_steps
            + self.k_dtok_s * draft_tokens
            + self.k_ver_s * verify_tokens
            + self.k_req_s * requests
            + self.k_spec_s * spec_requests
            + self.k_tree_s * tree_tokens
        )
        return self.scale * t

    def max_tokens_within(
        self, seconds: float, draft_steps: int = 0, context_tokens: int = 0, draft_tokens: int = 0,
        verify_tokens: int = 0,
    ) -> int:
        """Most batch tokens (prefill + verify) whose iteration fits in `seconds`, when
        `verify_tokens` of them are verify tokens and the rest are priced as prefill.

        The prefill^2 term is ignored (an upper bound when the batch carries a prefill chunk);
        per-request terms count the decodes (estimated from the tokens) and one prefill chunk.
        The answer may be below `verify_tokens`: then not even those fit.
        """
        decodes, spec = estimate_requests(0, verify_tokens, draft_steps, draft_tokens)
        left = seconds / self.scale - (
            self.base_s
            + self.k_ctx_s * context_tokens
            + self.d_step_s * draft_steps
            + self.k_dtok_s * draft_tokens
            + self.k_ver_s * verify_tokens
            + self.k_req_s * (decodes + 1)
            + self.k_spec_s * spec
        )
        if left < 0:
            return 0
        lo = self.k_tok_s
        at_knee = lo * self.knee_tokens
        if left < at_knee:  # below the knee (so lo > 0)
            return int(left / lo + 1e-9)
        hi = lo + self.k_knee_s
        n = self.knee_tokens + (left - at_knee) / hi + 1e-9 if hi > 0 else math.inf
        return _INF_TOKENS if n >= _INF_TOKENS else int(n)

    # ---- online refit -----------------------------------------------------------------

    def observe(self, report: protos.IterationReport, defer_refit: bool = False) -> None:
        """Update the model from one measured iteration (robust to outliers).

        The scale updates at once; a due windowed refit (~ms) runs now, or with
        `defer_refit` at the next `refit_if_due()` (the sidecar runs it after sending its plan)."""
        measured = report.end_s - report.start_s
        if report.forward_s > 0 and not measured > 0:
            measured = report.forward_s
        self.observe_features(report_features(report), measured, defer_refit)

    def observe_features(self, features: Sequence[float], measured: float, defer_refit: bool = False) -> None:
        """`observe` from `iteration_time`'s arguments (`report_features` order) and the
        measured seconds; ignored unless `measured` is positive and finite."""
        if not (measured > 0 and math.isfinite(measured)):
            return
        feats = tuple(features)
        if len(feats) < 8:  # counts not given: the same estimates iteration_time uses
            feats = (*(tuple(feats) + (0,) * 5)[:5], *estimate_requests(feats[0], feats[1], feats[2],
                                                                      feats[4] if len(feats) > 4 else 0), 0)
        row = (*feats[:5], measured, *feats[5:8])
        base = self.iteration_time(*feats) / self.scale
        if base > 0:
            # Clip around the current scale: one stall must not swing it, yet a profile that
            # is off by 10x still converges (geometrically, a factor <= 4 per observation).
            ratio = min(4.0 * self.scale, max(0.25 * self.scale, measured / base))
            self.scale = (1 - self.ewma) * self.scale + self.ewma * ratio
        self._samples.append(row)
        self._since_refit += 1
        if not defer_refit:
            self.refit_if_due()

    def refit_if_due(self) -> bool:
        """Run the windowed refit if `refit_every` observations arrived since the last one."""
        if not self._refit_due():
            return False
        for _ in self._refit_from_window():
            pass
        return True

    def refit_step(self) -> bool:
        """One slice of a due windowed refit: one knee candidate (0.2-0.6 ms on the 2-core test
        box), so a full refit (~25 knees, 3.7-9 ms) never holds the sidecar's loop; the fit
        is of the window as it was when the refit started and lands at its last slice.
        Returns True while a refit is in progress."""
        if self._refit_job is None:
            if not self._refit_due():
                return False
            self._refit_job = self._refit_from_window()
        if next(self._refit_job, StopIteration) is StopIteration:
            self._refit_job = None
        return self._refit_job is not None

    def _refit_due(self) -> bool:
        if not self.refit_every or self._since_refit < self.refit_every:
            return False
        self._since_refit = 0
        return True

    def _refit_from_window(self) -> Iterator[None]:
        """The windowed refit, yielding after each knee candidate."""
        rows = np.asarray(self._samples, dtype=np.float64)
        if len(rows) < 32 or np.ptp(rows[:, 0] + rows[:, 1]) <= 0:
            return  # not enough spread in batch size to identify slopes
        # A model without per-request terms (e.g. a GPU profile) stays without them online.
        fixed = {} if any(getattr(self, k) for k in _REQUEST_COEFS) else {k: 0.0 for k in _REQUEST_COEFS}
        grid = _knee_grid(rows, self.knee_tokens)
        yield  # the copy and the grid are a slice of their own (~0.5 ms on 512 rows)
        try:
            for best in _fit_by_knee(rows, grid, fixed):
                yield
        except ValueError:
            return
        new = CostModel(**best[1], knee_tokens=best[2])
        if _rmse(new, rows) < _rmse(self, rows):
            for name in COEFS:
                setattr(self, name, getattr(new, name))
            self.knee_tokens = new.knee_tokens
            self.scale = 1.0

    # ---- fitting ----------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        samples: Iterable[Sequence[float]],
        knee_grid: Sequence[int] | None = None,
        fixed: Mapping[str, float] | None = None,
        **settings: Any,
    ) -> "CostModel":
        """Least-squares fit from rows (prefill, verify, draft_steps, context, draft_tokens, seconds)
        or the same followed by (requests, spec_requests, tree_tokens) (`report_features`);
        6-column rows get the requests estimated from their tokens (`estimate_requests`).

        Residuals are relative (weighted by 1/seconds). The knee is chosen from `knee_grid`
        (default: a grid over the observed batch sizes) by residual; coefficients are kept non-negative (a negative one is dropped and the rest
        refit). `fixed` pins some coefficients (e.g. k_ctx_s from a roofline) and fits the rest.
        """
        rows = np.asarray(list(samples) if not isinstance(samples, np.ndarray) else samples, dtype=np.float64)
        best = None
        for best in _fit_by_knee(rows, knee_grid, fixed):
            pass
        assert best is not None
        return cls(**best[1], knee_tokens=best[2], **settings)

    def coefficients(self) -> dict[str, float]:
        """The fitted pieces (seconds) and knee, e.g. for a profile YAML."""
        out = {name: getattr(self, name) for name in COEFS}
        out["knee_tokens"] = self.knee_tokens
        return out


def estimate_requests(prefill_tokens: float, verify_tokens: float, draft_steps: float,
                      draft_tokens: float) -> tuple[float, float]:
    """(requests, spec_requests) when only token counts are known: every decode contributes
    one root to `verify_tokens` (the rest are draft tokens), a prefill is one chunk, and with
    draft steps every decode that has draft tokens speculates."""
    decodes = max(0.0, verify_tokens - draft_tokens)
    spec = min(decodes, draft_tokens) if draft_steps > 0 and draft_tokens > 0 else 0.0
    return decodes + (1.0 if prefill_tokens > 0 else 0.0), spec


def report_features(report: protos.IterationReport) -> tuple[int, ...]:
    """(prefill, verify, draft_steps, context, draft_tokens, requests, spec_requests,
    tree_tokens) of one report: the arguments of `CostModel.iteration_time`."""
    draft_tokens = spec = tree = 0
    if report.draft_steps > 0:
        # Reports carry verify tokens, not draft tokens; every verified draft token was
        # drafted once (non-root verify tokens), the best estimate available on the wire.
        for p in report.progress:
            draft_tokens += p.verified
            spec += p.verified > 0
            tree += p.verified if p.verified > p.depth else 0  # wider than a chain
    return (report.prefill_tokens, report.verify_tokens, report.draft_steps, report.context_tokens,
            draft_tokens, len(report.progress), spec, tree)


def _draft_tokens_of(report: protos.IterationReport) -> int:
    return report_features(report)[4]


def _fit_by_knee(rows: np.ndarray, knee_grid: Sequence[int] | None, fixed: Mapping[str, float] | None
                 ) -> Iterator[tuple[float, dict[str, float], int]]:
    """`CostModel.fit`'s search: after each knee of the grid, the best (sse, coefficients,
    knee) so far. Raises ValueError on bad rows (at the first step)."""
    if rows.ndim != 2 or rows.shape[1] not in (6, 9) or len(rows) < 2:
        raise ValueError("fit needs >= 2 rows of (prefill, verify, draft_steps, context, draft_tokens, seconds"
                         "[, requests, spec_requests, tree_tokens])")
    if not np.all(np.isfinite(rows)) or np.any(rows < 0):
        raise ValueError("fit samples must be finite and non-negative")
    fixed = dict(fixed or {})
    if rows.shape[1] == 6:  # per-request terms are not observed: keep the classic model
        for name in _REQUEST_COEFS:
            fixed.setdefault(name, 0.0)
    if "k_ver_s" not in fixed and (not np.any(rows[:, 0] > 0) or not np.any(rows[:, 1] > 0)):
        fixed["k_ver_s"] = 0.0  # verify premium needs both prefill and verify samples
    unknown = set(fixed) - set(COEFS) - {"knee_tokens"}
    if unknown:
        raise ValueError(f"unknown fixed coefficients: {sorted(unknown)}")
    if "knee_tokens" in fixed:
        knee_grid = [int(fixed.pop("knee_tokens"))]
    elif knee_grid is None:
        knee_grid = _knee_grid(rows, 0)
    best: tuple[float, dict[str, float], int] | None = None
    for knee in knee_grid:
        coefs, sse = _nnls_fit(rows, int(knee), fixed)
        if best is None or sse < best[0] - 1e-15:
            best = (sse, coefs, int(knee))
        yield best


def _features(rows: np.ndarray, knee: int) -> np.ndarray:
    prefill, verify, steps, ctx, dtok = (rows[:, i] for i in range(5))
    if rows.shape[1] >= 9:
        req, spec, tree = rows[:, 6], rows[:, 7], rows[:, 8]
    else:
        est = np.array([estimate_requests(*r) for r in rows[:, [0, 1, 2, 4]]]).reshape(-1, 2)
        req, spec, tree = est[:, 0], est[:, 1], np.zeros(len(rows))
    n = prefill + verify
    return np.stack(
        [np.ones_like(n), n, np.maximum(0.0, n - knee), ctx, prefill * prefill, steps, dtok, verify,
         req, spec, tree], axis=1
    )  # [rows, len(COEFS)]


def _nnls_fit(rows: np.ndarray, knee: int, fixed: Mapping[str, float]) -> tuple[dict[str, float], float]:
    """Non-negative least squares by an active-set loop (few features; exact enough here)."""
    X = _features(rows, knee)
    y = rows[:, 5].copy()
    # Relative residuals: a 1 ms error matters at 8 ms, not at 200 ms.
    w = 1.0 / np.maximum(y, 1e-4)
    coefs = {name: 0.0 for name in COEFS}
    for name, value in fixed.items():
        coefs[name] = float(value)
        y -= X[:, COEFS.index(name)] * float(value)
    X, y = X * w[:, None], y * w
    free = [i for i, name in enumerate(COEFS) if name not in fixed and np.any(X[:, i] != 0)]
    # Column scaling keeps lstsq well conditioned (features span 1 .. 1e10).
    while free:
        A = X[:, free]
        norms = np.linalg.norm(A, axis=0)
        norms[norms == 0] = 1.0
        sol = np.linalg.lstsq(A / norms, y, rcond=None)[0] / norms
        if np.all(sol >= -1e-15):
            for i, v in zip(free, sol):
                coefs[COEFS[i]] = max(0.0, float(v))
            break
        free.pop(int(np.argmin(sol)))  # drop the most negative and refit
    resid = y - X @ np.array([coefs[n] if n not in fixed else 0.0 for n in COEFS])
    return coefs, float(resid @ resid)


def _knee_grid(rows: np.ndarray, current: int, points: int = 20) -> list[int]:
    """Candidate knees: a geometric grid over the observed batch sizes plus the current knee
    and its neighbourhood (bounded size: an online refit must stay ~1 ms)."""
    n = rows[:, 0] + rows[:, 1]
    lo, hi = max(1.0, float(n.min())), max(2.0, float(n.max()))
    grid = {0} | {int(v) for v in np.geomspace(lo, hi, points)}
    if current > 0:
        grid |= {int(current * f) for f in (0.8, 0.9, 1.0, 1.1, 1.25)}
    if len(np.unique(n)) <= 4 * points:  # few distinct sizes (profiles, tables): try each
        grid |= {int(v) for v in np.unique(n)}
    return sorted(k for k in grid if k <= hi)


def _rmse(model: CostModel, rows: np.ndarray) -> float:
    coefs = np.array([getattr(model, name) for name in COEFS])
    pred = model.scale * (_features(rows, model.knee_tokens) @ coefs)
    return float(np.sqrt(np.mean((pred - rows[:, 5]) ** 2)))


# ----------------------------------------------------------------------------------------
# Hardware profiles (configs/hardware/*.yaml)
# ----------------------------------------------------------------------------------------


@dataclass
class HardwareProfile:
    """One engine configuration on one kind of hardware: limits, cost model, priors."""

    name: str
    """Profile name, e.g. 'h100-llama3.1-8b-eagle3'."""
    source: str
    """Where the numbers come from (papers, tables, measurements)."""
    engine: EngineLimits
    """Limits assumed until the engine's `EngineHello` says otherwise."""
    cost: CostModel
    """Iteration-time model."""
    acceptance_priors: dict[str, list[float]] = field(default_factory=dict)
    """Per SLO class: per-position conditional acceptance alpha_j ('default' for unknown classes)."""
    policy_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per policy name: config overrides suited to this hardware (e.g. fcfs chunk_size)."""


_PROFILE_KEYS = {"name", "source", "engine", "cost", "samples", "acceptance", "policy_defaults"}
_SAMPLE_COLS = ("prefill", "verify", "draft_steps", "context", "draft_tokens", "seconds")


def load_profile(path: str | Path) -> HardwareProfile:
    """Load a hardware profile YAML (schema: see configs/hardware/README.md or any profile).

    `cost:` gives coefficients directly; `samples:` (rows or dicts with the columns
    prefill, verify, draft_steps, context, draft_tokens, seconds) are fit by least squares
    with the `cost:` values held fixed. Raises ValueError with the file name on bad input.
    """
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"hardware profile {path}: cannot read: {e}") from None
    try:
        return profile_from_dict(doc)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"hardware profile {path}: {e}") from None


def profile_from_dict(doc: Any) -> HardwareProfile:
    if not isinstance(doc, dict):
        raise ValueError("top level must be a mapping")
    unknown = set(doc) - _PROFILE_KEYS
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} (allowed: {sorted(_PROFILE_KEYS)})")
    for key in ("name", "source", "engine"):
        if key not in doc:
            raise ValueError(f"missing '{key}'")
    engine = EngineLimits(**{**doc["engine"], "depth_tiers": tuple(doc["engine"].get("depth_tiers", ()))})
    cost_doc = dict(doc.get("cost") or {})
    settings = {k: cost_doc.pop(k) for k in ("ewma", "window", "refit_every") if k in cost_doc}
    allowed = set(COEFS) | {"knee_tokens"}
    if set(cost_doc) - allowed:
        raise ValueError(f"unknown cost keys {sorted(set(cost_doc) - allowed)} (allowed: {sorted(allowed)})")
    samples = doc.get("samples")
    if samples:
        rows = [_sample_row(s) for s in samples]
        cost = CostModel.fit(rows, fixed={k: float(v) for k, v in cost_doc.items()}, **settings)
    elif cost_doc:
        cost = CostModel(**{k: (int(v) if k == "knee_tokens" else float(v)) for k, v in cost_doc.items()}, **settings)
    else:
        raise ValueError("needs 'cost' coefficients and/or 'samples' to fit")
    priors = {str(k): [float(a) for a in v] for k, v in (doc.get("acceptance") or {}).items()}
    for cls_name, alphas in priors.items():
        if not alphas or not all(0.0 <= a < 1.0 for a in alphas):
            raise ValueError(f"acceptance '{cls_name}': need a non-empty list of alphas in [0, 1)")
    return HardwareProfile(
        name=str(doc["name"]),
        source=str(doc["source"]),
        engine=engine,
        cost=cost,
        acceptance_priors=priors,
        policy_defaults={str(k): dict(v) for k, v in (doc.get("policy_defaults") or {}).items()},
    )


def _sample_row(s: Any) -> tuple[float, ...]:
    if isinstance(s, dict):
        if "seconds" not in s and "ms" not in s:
            raise ValueError(f"sample {s} needs 'seconds' or 'ms'")
        seconds = float(s["seconds"]) if "seconds" in s else float(s["ms"]) / 1e3
        return tuple(float(s.get(c, 0)) for c in _SAMPLE_COLS[:5]) + (seconds,)
    if len(s) != 6:
        raise ValueError(f"sample row {s} must have 6 columns {_SAMPLE_COLS}")
    return tuple(float(v) for v in s)


def with_limits(profile: HardwareProfile, limits: EngineLimits) -> HardwareProfile:
    """The same profile with the engine's own limits (after its hello)."""
    return replace(profile, engine=limits)


__all__ = ["EngineLimits", "CostModel", "HardwareProfile", "estimate_requests", "load_profile",
           "profile_from_dict", "report_features", "with_limits"]
