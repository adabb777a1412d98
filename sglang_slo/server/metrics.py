"""Prometheus metrics of the server (own registry; exposed at GET /metrics).

Per SLO class: requests finished, requests that met their SLO (TTFT within its objective and
every token by its deadline t0 + (n-1) * TPOT, SLOs-Serve's definition, stage-aware through
`deadline_miss`), the attainment ratio, TTFT and TPOT histograms. Engine-wide: plan latency,
speculative acceptance, iterations run on the local fallback, sidecar restarts, KV free.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the app)

_LAT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)  # seconds


class ServerMetrics:
    """All metrics of one server process."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        p = "sglang_slo_"
        self.requests = Counter(p + "requests_finished", "Finished requests", ["slo_class", "reason"], registry=r)
        self.slo_met = Counter(p + "requests_slo_met", "Finished requests that met TTFT and all token deadlines", ["slo_class"], registry=r)
        self.attainment = Gauge(p + "slo_attainment", "Fraction of finished requests that met their SLO", ["slo_class"], registry=r)
        self.ttft = Histogram(p + "ttft_seconds", "Time to first token", ["slo_class"], buckets=_LAT_BUCKETS, registry=r)
        self.tpot = Histogram(p + "tpot_seconds", "Mean time per output token after the first", ["slo_class"], buckets=_LAT_BUCKETS, registry=r)
        self.rejected = Counter(p + "requests_rejected", "Requests refused (400 bad input, 429 overload)", ["code"], registry=r)
        self.aborted = Counter(p + "requests_aborted", "Requests aborted by client disconnect", registry=r)
        self.plan_latency = Histogram(p + "plan_latency_seconds", "Planner time per plan", buckets=_LAT_BUCKETS, registry=r)
        self.spec_verified = Counter(p + "spec_verified_tokens", "Draft tokens verified", registry=r)
        self.spec_accepted = Counter(p + "spec_accepted_tokens", "Draft tokens accepted", registry=r)
        self.iterations = Counter(p + "iterations", "Engine iterations", ["planned"], registry=r)
        self.fallback = Counter(p + "fallback_iterations", "Iterations run on the local fallback policy", registry=r)
        self.sidecar_restarts = Counter(p + "sidecar_restarts", "Planner sidecar restarts", registry=r)
        self.kv_free = Gauge(p + "kv_free_tokens", "Free KV cache slots (tokens)", registry=r)
        self.kv_capacity = Gauge(p + "kv_capacity_tokens", "Total KV cache slots (tokens)", registry=r)
        self.running = Gauge(p + "requests_in_flight", "Requests submitted and not finished", registry=r)
        self.waiting = Gauge(p + "requests_waiting", "Requests queued in the engine without KV", registry=r)
        self._finished: dict[str, int] = {}
        self._met: dict[str, int] = {}

    def request_done(self, slo_class: str, reason: str, ttft_s: float | None, tpot_s: float | None, met: bool) -> None:
        """Record one finished request (aborted ones only count in `requests`)."""
        self.requests.labels(slo_class, reason).inc()
        if reason == "abort":
            return
        if ttft_s is not None:
            self.ttft.labels(slo_class).observe(ttft_s)
        if tpot_s is not None:
            self.tpot.labels(slo_class).observe(tpot_s)
        self._finished[slo_class] = self._finished.get(slo_class, 0) + 1
        if met:
            self.slo_met.labels(slo_class).inc()
            self._met[slo_class] = self._met.get(slo_class, 0) + 1
        self.attainment.labels(slo_class).set(self._met.get(slo_class, 0) / self._finished[slo_class])

    def render(self) -> bytes:
        return generate_latest(self.registry)
