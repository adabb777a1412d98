"""SLO intake on the scheduler side: `custom_params["slo"]` + `priority` -> absolute deadlines.

Parsing and validation are `sglang_slo.slo.parse_slo`'s (shared with the HTTP server); this
module only anchors the relative objectives on the engine clock and stores the result on
SGLang's `Req` (a plain object: extra attributes are fine).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from protos.messages import Slo
from sglang_slo.slo import SloCatalog, SloError, parse_slo

log = logging.getLogger(__name__)

SLO_ATTR = "slo"  # Req attribute holding a `ReqSlo`
CLASSES_ENV = "SGLANG_SLO_CLASSES"  # path of the SLO class catalog (YAML)
_DEFAULT_CLASSES = Path(__file__).resolve().parents[2] / "configs" / "slo_classes.yaml"


@dataclasses.dataclass
class ReqSlo:
    """A request's objectives anchored on the engine clock (seconds, `time.monotonic`)."""

    slo: Slo
    arrival_s: float
    """When the scheduler received the request."""
    session_id: str = ""
    first_token_s: float = 0.0
    """When the first output token was committed (0 = not yet)."""

    @property
    def ttft_deadline_s(self) -> float:
        return self.arrival_s + self.slo.ttft_s

    def token_deadline_s(self, n: int) -> float:
        """Deadline of output token n (1-based): t0 + (n - 1) * tpot, t0 = max(TTFT deadline, first token)."""
        t0 = max(self.ttft_deadline_s, self.first_token_s)
        return t0 + (n - 1) * self.slo.tpot_s


def load_catalog() -> SloCatalog:
    """The class catalog named by $SGLANG_SLO_CLASSES, else the repo's configs/slo_classes.yaml."""
    path = os.environ.get(CLASSES_ENV) or (_DEFAULT_CLASSES if _DEFAULT_CLASSES.exists() else None)
    if path is None:
        return SloCatalog()
    return SloCatalog.load(path)


def parse_req_slo(
    custom_params: object, priority: object, catalog: SloCatalog, now_s: float
) -> ReqSlo:
    """Validate one request's annotation; raises `SloError` naming the offending field."""
    parsed = parse_slo(custom_params, priority, catalog=catalog, where="sampling_params.custom_params")
    return ReqSlo(slo=parsed.slo, arrival_s=now_s, session_id=parsed.session_id)


def attach_slo(req, catalog: SloCatalog, now_s: float, set_priority: bool) -> str | None:
    """Parse `req`'s SLO and store it as `req.slo`; return the error message if it is invalid.

    `req` is SGLang's `Req`. An explicit SGLang `priority` wins over the class priority; when
    the request carries none and `set_priority` (SGLang runs priority scheduling), the class
    priority becomes `req.priority`, so SGLang's priority queue and retraction see classes too.
    """
    custom = getattr(req.sampling_params, "custom_params", None)
    try:
        req_slo = parse_req_slo(custom, req.priority, catalog, now_s)
    except SloError as e:
        return f"invalid SLO: {e}"
    setattr(req, SLO_ATTR, req_slo)
    if set_priority and req.priority is None and _has_slo(custom):
        req.priority = req_slo.slo.priority
    return None


def req_slo(req) -> ReqSlo | None:
    return getattr(req, SLO_ATTR, None)


def deadline_key(req) -> float:
    """Earliest-deadline-first key: the deadline of the request's next token on the SLO
    schedule anchored at its TTFT deadline (seconds). Uses only values that are identical on
    every TP rank (arrival stamp, SLO, tokens done), never a rank-local measurement."""
    s = req_slo(req)
    if s is None:
        return float("inf")
    return s.ttft_deadline_s + len(req.output_ids) * s.slo.tpot_s


def _has_slo(custom: object) -> bool:
    return isinstance(custom, dict) and "slo" in custom
