"""SLO intake: named classes, `custom_params["slo"]`, `priority` and `x-slo-*` headers -> `protos.Slo`.

Pure (no HTTP, no clocks): the HTTP server and the SGLang plugin both call `parse_slo`. All
times in the result are relative seconds (TTFT from arrival, TPOT per token); the engine
turns them into deadlines on its own clock.

Where an SLO comes from, lowest precedence first (SGLang's `apply_header_overrides` order):
1. the catalog's default class (no annotation at all),
2. the named class (`custom_params.slo.class` or header `x-slo-class`),
3. explicit values in `custom_params.slo` (`ttft_ms`, `tpot_ms`, `<stage>_tpot_ms`, ...),
4. headers `x-slo-ttft-ms`, `x-slo-tpot-ms`.
`priority` is SGLang's top-level request field; absent, the class's priority applies.

`custom_params["slo"]` must stay a flat `dict[str, scalar]` (SGLang 0.5.23's
`CustomParamValue`), so per-stage values are flattened into `<stage>_<field>` keys:

    {"class": "reasoning", "think_tpot_ms": 30, "answer_tpot_ms": 120}
    {"class": "tool-call", "session": "agent-7"}   (then "tool-final" for the loop's answer)
    {"ttft_ms": 300, "tpot_ms": 40}

Multi-stage: a class lists stages in order; a stage with an `end_marker` (reasoning's
`</think>`) hands over to the next stage when that text is generated. A request starts in the
stage named by `slo.stage` (default: the first) and its `Slo.stages` lists that stage and the
ones reached through markers after it. Tool-calling agent loops send their intermediate calls
as class `tool-call` and the final answer as `tool-final`, all with one `session` id (the
planner groups them; the engine reuses their shared prefix).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from protos.messages import Slo, Stage

MAX_TTFT_S = 3600.0  # seconds; larger is "absurd" (almost surely a unit mistake)
MAX_TPOT_S = 60.0  # seconds per token
MAX_STAGE_TOKENS = 1_000_000
MAX_PRIORITY = 2**31 - 1
FALLBACK_SLO = Slo(ttft_s=30.0, tpot_s=1.0, slo_class="default")  # no catalog, no annotation

DEFAULT_STAGE_MARKER = "</think>"  # ends a stage whose spec names no end_marker (not the last)
DEFAULT_STAGE_NAMES = {2: ["think", "answer"]}  # unnamed stages; otherwise stage0, stage1, ...

HEADER_TTFT = "x-slo-ttft-ms"
HEADER_TPOT = "x-slo-tpot-ms"
HEADER_CLASS = "x-slo-class"
HEADER_SESSION = "x-slo-session"

_STAGE_FIELDS = ("ttft_ms", "tpot_ms", "tokens")
_TOP_FIELDS = {"class", "ttft_ms", "tpot_ms", "priority", "best_effort", "session", "stage"}


class SloError(ValueError):
    """Invalid SLO input; `field` names the offending field (e.g. `custom_params.slo.tpot_ms`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class StageSpec:
    """One stage of a class (reasoning: think, then answer)."""

    name: str
    tpot_s: float
    """Per-token spacing in this stage, seconds."""
    ttft_s: float = 0.0
    """TTFT if the request starts in this stage; else extra allowance at stage start, seconds."""
    tokens: int = 0
    """Expected output tokens of the stage (0 = unknown)."""
    end_marker: str = ""
    """Generated text that ends this stage and starts the next ('' = stage lasts to the end)."""


@dataclass(frozen=True)
class SloClass:
    """A named SLO class from `configs/slo_classes.yaml`."""

    name: str
    ttft_s: float
    """Time-to-first-token objective, seconds."""
    tpot_s: float
    """Time-per-output-token objective (of the first stage), seconds."""
    stages: tuple[StageSpec, ...] = ()
    """Ordered stages; empty = single stage."""
    priority: int = 0
    """SGLang-style priority when the request sets none (larger = more important)."""
    best_effort: bool = False
    """Served without SLO guarantee (batch)."""


@dataclass(frozen=True)
class SloCatalog:
    """All named classes plus the class used for requests without any annotation."""

    classes: Mapping[str, SloClass] = field(default_factory=dict)
    default: str = ""
    """Class of un-annotated requests ('' = `FALLBACK_SLO`)."""

    def get(self, name: str, field_name: str) -> SloClass:
        try:
            return self.classes[name]
        except KeyError:
            known = ", ".join(sorted(self.classes)) or "none configured"
            raise SloError(field_name, f"unknown SLO class {name!r} (known: {known})") from None

    @classmethod
    def load(cls, path: str | Path, unloaded_tpot_s: float | None = None, default: str = "chat") -> SloCatalog:
        """Read the project's class file (`eval.slo_classes` format: seconds, unnamed stages).

        `unloaded_tpot_s` rescales every class for a slow engine (CPU tiny model) with
        `eval.slo_classes.scale_for_unloaded_tpot`. `default` is the class of un-annotated
        requests ('' or a missing class = `FALLBACK_SLO`).
        """
        import msgspec

        from eval.slo_classes import load_slo_classes, scale_for_unloaded_tpot

        try:
            classes = load_slo_classes(path)
            if unloaded_tpot_s:
                classes = scale_for_unloaded_tpot(classes, unloaded_tpot_s)
        except ValueError as e:
            raise SloError(str(path), str(e)) from None
        data = {name: msgspec.to_builtins(c) for name, c in classes.items()}
        return cls.from_mapping({"classes": data, "default": default if default in data else ""}, source=str(path))

    @classmethod
    def from_mapping(cls, data: Mapping, source: str = "slo classes") -> SloCatalog:
        """Accepts `{classes: {name: spec}, default: name}` or `{name: spec}` directly.

        spec: `ttft_ms|ttft_s`, `tpot_ms|tpot_s`, optional `priority`, `best_effort`, and
        `stages: [{name, tpot_ms|tpot_s, ttft_ms|ttft_s, tokens, end_marker}]` (a list, or a
        mapping name -> stage spec in order). Unnamed stages are think/answer when there are
        two, else stage0, stage1, ...; every stage but the last ends at `end_marker`
        (default `</think>`). Other keys (e.g. `cpu_tpot_multiplier`) are ignored.
        """
        if not isinstance(data, Mapping):
            raise SloError(source, "must be a mapping of class name -> spec")
        raw = data.get("classes", data)
        if isinstance(raw, list):  # [{name: ..., ...}]
            raw = {str(c.get("name")): c for c in raw if isinstance(c, Mapping)}
        classes = {}
        for name, spec in raw.items():
            if name in ("default", "default_class") or not isinstance(spec, Mapping):
                continue
            classes[str(name)] = _class_from_spec(str(name), spec, f"{source}: {name}")
        default = str(data.get("default", data.get("default_class", "")) or "")
        if default and default not in classes:
            raise SloError(f"{source}: default", f"unknown class {default!r}")
        return cls(classes=classes, default=default)


@dataclass(frozen=True)
class SloRequest:
    """The outcome of intake for one request."""

    slo: Slo
    session_id: str = ""
    """Agent-loop id shared by the calls of one tool-calling session ('' = none)."""
    stage_markers: tuple[str, ...] = ()
    """`stage_markers[i]` is the text that ends stage i of `slo.stages` (and starts i + 1)."""


def parse_slo(
    custom_params: object = None,
    priority: object = None,
    headers: Mapping[str, str] | None = None,
    catalog: SloCatalog | None = None,
    *,
    where: str = "custom_params",
) -> SloRequest:
    """Validate a request's SLO annotation and resolve it against `catalog`.

    `custom_params` is the request's `custom_params` (None or a dict possibly holding "slo"),
    `priority` the top-level SGLang `priority`, `headers` the HTTP headers (any case).
    `where` prefixes field names in errors (the server passes `sampling_params.custom_params`
    for `/generate`). Raises `SloError` naming the field on any invalid value.
    """
    catalog = catalog or SloCatalog()
    hdr = {k.lower(): v for k, v in (headers or {}).items()}
    body = _slo_body(custom_params, where)
    f = f"{where}.slo"

    # 1-2: start from a class (explicit, header, or the default)
    class_name = body.get("class", hdr.get(HEADER_CLASS))
    class_field = f"{f}.class" if "class" in body else f"header {HEADER_CLASS}"
    if class_name is not None:
        if not isinstance(class_name, str) or not class_name:
            raise SloError(class_field, "must be a non-empty string")
        base = catalog.get(class_name, class_field)
    elif catalog.default:
        base = catalog.classes[catalog.default]
    else:
        base = None

    stages = _stages_of(base) if base else [StageSpec("", FALLBACK_SLO.tpot_s, FALLBACK_SLO.ttft_s)]
    start = 0
    if "stage" in body:
        names = [s.name for s in stages]
        if body["stage"] not in names or not body["stage"]:
            raise SloError(f"{f}.stage", f"unknown stage {body['stage']!r} (class stages: {names})")
        start = names.index(body["stage"])
    # stages reachable from `start` through end markers
    end = start
    while stages[end].end_marker and end + 1 < len(stages):
        end += 1
    active = [dict(name=s.name, tpot_s=s.tpot_s, ttft_s=s.ttft_s, tokens=s.tokens) for s in stages[start : end + 1]]
    markers = tuple(s.end_marker for s in stages[start:end])
    ttft_s = stages[start].ttft_s or (base.ttft_s if base else FALLBACK_SLO.ttft_s)

    # 3: explicit body values
    for key, value in body.items():
        if key in _TOP_FIELDS:
            continue
        stage_name, fld = _split_stage_key(key)
        idx = next((i for i, s in enumerate(active) if stage_name and s["name"] == stage_name), None)
        if fld is None or idx is None:
            known = sorted(_TOP_FIELDS | {f"{s['name']}_{x}" for s in active if s["name"] for x in _STAGE_FIELDS})
            raise SloError(f"{f}.{key}", f"unknown SLO field (known: {', '.join(known)})")
        if fld == "tokens":
            active[idx]["tokens"] = _count(value, f"{f}.{key}")
        elif fld == "tpot_ms":
            active[idx]["tpot_s"] = _ms(value, f"{f}.{key}", MAX_TPOT_S)
        else:  # stage ttft: first active stage's is the request TTFT
            if idx == 0:
                ttft_s = _ms(value, f"{f}.{key}", MAX_TTFT_S)
            else:
                active[idx]["ttft_s"] = _ms(value, f"{f}.{key}", MAX_TTFT_S, allow_zero=True)
    if "ttft_ms" in body:
        ttft_s = _ms(body["ttft_ms"], f"{f}.ttft_ms", MAX_TTFT_S)
    if "tpot_ms" in body:
        active[0]["tpot_s"] = _ms(body["tpot_ms"], f"{f}.tpot_ms", MAX_TPOT_S)

    # 4: headers override
    if HEADER_TTFT in hdr:
        ttft_s = _ms(hdr[HEADER_TTFT], f"header {HEADER_TTFT}", MAX_TTFT_S, text=True)
    if HEADER_TPOT in hdr:
        active[0]["tpot_s"] = _ms(hdr[HEADER_TPOT], f"header {HEADER_TPOT}", MAX_TPOT_S, text=True)

    # priority: SGLang's top-level field (or slo.priority), else the class's
    prio = priority if priority is not None else body.get("priority")
    prio_field = "priority" if priority is not None else f"{f}.priority"
    if prio is None:
        prio = base.priority if base else 0
    elif isinstance(prio, bool) or not isinstance(prio, int) or abs(prio) > MAX_PRIORITY:
        raise SloError(prio_field, f"must be an integer with |priority| <= {MAX_PRIORITY}, got {prio!r}")

    best_effort = base.best_effort if base else False
    if "best_effort" in body:
        if not isinstance(body["best_effort"], bool):
            raise SloError(f"{f}.best_effort", "must be true or false")
        best_effort = body["best_effort"]

    session = body.get("session", hdr.get(HEADER_SESSION, ""))
    if not isinstance(session, str) or len(session) > 256:
        raise SloError(f"{f}.session", "must be a string of at most 256 characters")

    slo = Slo(
        ttft_s=ttft_s,
        tpot_s=active[0]["tpot_s"],
        stages=[Stage(tpot_s=s["tpot_s"], tokens=s["tokens"], ttft_s=s["ttft_s"] if i else 0.0) for i, s in enumerate(active)]
        if len(active) > 1
        else [],
        slo_class=base.name if base else FALLBACK_SLO.slo_class,
        priority=prio,
        best_effort=best_effort,
    )
    return SloRequest(slo=slo, session_id=session, stage_markers=markers)


# ------------------------------------------------------------------------------------------


def _slo_body(custom_params: object, where: str) -> dict:
    if custom_params is None:
        return {}
    if not isinstance(custom_params, Mapping):
        raise SloError(where, f"must be an object, got {type(custom_params).__name__}")
    body = custom_params.get("slo")
    if body is None:
        return {}
    if not isinstance(body, Mapping):
        raise SloError(f"{where}.slo", f"must be an object, got {type(body).__name__}")
    for k, v in body.items():
        if not isinstance(k, str):
            raise SloError(f"{where}.slo", "keys must be strings")
        if not (v is None or isinstance(v, (str, int, float, bool))):
            raise SloError(f"{where}.slo.{k}", "must be a scalar (SGLang custom_params are flat)")
    return {k: v for k, v in body.items() if v is not None}


def _split_stage_key(key: str) -> tuple[str, str | None]:
    """'think_tpot_ms' -> ('think', 'tpot_ms'); unknown suffix -> (key, None)."""
    for fld in _STAGE_FIELDS:
        if key.endswith("_" + fld):
            return key[: -len(fld) - 1], fld
    return key, None


def _ms(value: object, field_name: str, max_s: float, text: bool = False, allow_zero: bool = False) -> float:
    """Milliseconds (number, or numeric string for headers) -> seconds, validated."""
    if text:
        try:
            value = float(str(value).strip())
        except ValueError:
            raise SloError(field_name, f"must be a number of milliseconds, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SloError(field_name, f"must be a number of milliseconds, got {value!r}")
    if not math.isfinite(value):
        raise SloError(field_name, f"must be finite, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise SloError(field_name, f"must be positive, got {value!r}")
    if value / 1000.0 > max_s:
        raise SloError(field_name, f"{value!r} ms is absurd (max {max_s * 1000:.0f} ms)")
    return value / 1000.0


def _count(value: object, field_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_STAGE_TOKENS:
        raise SloError(field_name, f"must be an integer in [0, {MAX_STAGE_TOKENS}], got {value!r}")
    return value


def _seconds(spec: Mapping, key: str, where: str, max_s: float, required: bool, allow_zero: bool = False) -> float:
    """`<key>_s` or `<key>_ms` of a YAML spec, in seconds."""
    if f"{key}_s" in spec:
        v = spec[f"{key}_s"]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SloError(f"{where}.{key}_s", f"must be a number of seconds, got {v!r}")
        return _ms(v * 1000.0, f"{where}.{key}_s", max_s, allow_zero=allow_zero)
    if f"{key}_ms" in spec:
        return _ms(spec[f"{key}_ms"], f"{where}.{key}_ms", max_s, allow_zero=allow_zero)
    if required:
        raise SloError(where, f"needs {key}_ms or {key}_s")
    return 0.0


def _stage_from_spec(spec: Mapping, where: str, name: str, last: bool) -> StageSpec:
    return StageSpec(
        name=name,
        tpot_s=_seconds(spec, "tpot", where, MAX_TPOT_S, required=True),
        ttft_s=_seconds(spec, "ttft", where, MAX_TTFT_S, required=False, allow_zero=True),
        tokens=_count(spec.get("tokens", 0), f"{where}.tokens"),
        end_marker="" if last else str(spec.get("end_marker", DEFAULT_STAGE_MARKER) or ""),
    )


def _class_from_spec(name: str, spec: Mapping, where: str) -> SloClass:
    raw_stages = spec.get("stages") or []
    if isinstance(raw_stages, Mapping):
        raw_stages = [{"name": k, **(v or {})} for k, v in raw_stages.items()]
    n = len(raw_stages)
    default_names = DEFAULT_STAGE_NAMES.get(n, [f"stage{i}" for i in range(n)])
    stages = tuple(
        _stage_from_spec(s, f"{where}.stages[{i}]", str(s.get("name", default_names[i])), last=i == n - 1)
        for i, s in enumerate(raw_stages)
    )
    if "tpot_ms" in spec or "tpot_s" in spec or not stages:
        tpot_s = _seconds(spec, "tpot", where, MAX_TPOT_S, required=True)
    else:
        tpot_s = stages[0].tpot_s
    ttft_s = _seconds(spec, "ttft", where, MAX_TTFT_S, required=not stages or not stages[0].ttft_s)
    ttft_s = ttft_s or stages[0].ttft_s
    prio = spec.get("priority", 0)
    if isinstance(prio, bool) or not isinstance(prio, int):
        raise SloError(f"{where}.priority", "must be an integer")
    return SloClass(name, ttft_s, tpot_s, stages, prio, bool(spec.get("best_effort", False)))


def _stages_of(c: SloClass) -> list[StageSpec]:
    """The class's stages, or one unnamed stage for a single-stage class."""
    if not c.stages:
        return [StageSpec("", c.tpot_s, c.ttft_s)]
    first = c.stages[0]
    if first.ttft_s <= 0:  # the first stage's TTFT is the class TTFT
        first = StageSpec(first.name, first.tpot_s, c.ttft_s, first.tokens, first.end_marker)
    return [first, *c.stages[1:]]
