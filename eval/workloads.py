"""Workload generators: typed YAML specs (configs/workloads/*.yaml) -> a list of requests.

Classes (reference workloads-and-calibration §2.3):
- `single`: one request per arrival (chat, coding, summarization, batch), lengths from
  distributions;
- `tool_calling`: an agent loop of 1 + Geometric(p) calls (truncated at `max_calls`) sharing a
  session id and a system/tool prefix; call k+1's prompt is call k's context plus a tool
  result, and it ARRIVES only after call k finished plus a log-normal tool delay (closed loop:
  the simulator releases it); intermediate calls use a tight class, the final answer a loose one;
- `reasoning`: one request, two SLO stages in one stream (think, then answer).

Every request carries its true output length and its own true acceptance vector. Generation is
deterministic for a seed. Token counts are target-model tokens; for a model whose context is
below `FULL_SCALE_CONTEXT`, every length is scaled down proportionally and clipped to the context.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Union

import msgspec
import numpy as np
import yaml

from eval.acceptance_regimes import REGIMES, request_alphas
from eval.arrivals import ArrivalSpec, arrival_times
from eval.slo_classes import DEFAULT_PATH as DEFAULT_SLO_PATH
from eval.slo_classes import SloClass, load_slo_classes, scale_for_unloaded_tpot
from protos.messages import Slo

WORKLOAD_DIR = Path(__file__).resolve().parent.parent / "configs" / "workloads"
FULL_SCALE_CONTEXT = 8192  # tokens; below this model context, lengths are scaled down


class LengthDist(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """A token-count (or seconds) distribution; samples are clipped to [min, max]."""

    dist: str = "lognormal"
    """lognormal (of ln x: mu, sigma) | uniform (low..high) | fixed (value)."""
    mu: float = 0.0
    sigma: float = 0.0
    low: float = 0.0
    high: float = 0.0
    value: float = 0.0
    min: float = 1.0
    """Lower clip."""
    max: float = math.inf
    """Upper clip."""

    def __post_init__(self) -> None:
        if self.dist not in ("lognormal", "uniform", "fixed"):
            raise ValueError(f"length dist {self.dist!r} not one of lognormal, uniform, fixed")
        if self.dist == "uniform" and self.high < self.low:
            raise ValueError("uniform: high < low")
        if self.sigma < 0 or self.max < self.min:
            raise ValueError("sigma must be >= 0 and max >= min")

    @property
    def upper(self) -> float:
        """Largest value a sample can take (4096 stands in for an unbounded log-normal)."""
        top = {"fixed": self.value, "uniform": self.high}.get(self.dist, math.inf)
        return min(top, self.max) if math.isfinite(min(top, self.max)) else 4096.0

    def sample(self, rng: np.random.Generator) -> float:
        if self.dist == "lognormal":
            x = rng.lognormal(self.mu, self.sigma)
        elif self.dist == "uniform":
            x = rng.uniform(self.low, self.high)
        else:
            x = self.value
        return float(min(max(x, self.min), self.max))


class _ClassBase(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, tag_field="kind"):
    weight: float = 1.0
    """Share of arrivals (sessions for tool_calling) of this class; normalised over classes."""
    acceptance: str = "eagle2_chat"
    """Acceptance regime (eval.acceptance_regimes.REGIMES)."""
    acceptance_shift: float = 0.0
    """Added to every alpha (task adjustment: code +0.05, summarization +0.03, T=1 -0.1)."""
    tpot_baseline_multiplier: float = 0.0
    """> 0: this class's TPOT SLO = multiplier x the hardware's unloaded TPOT (AdaServe Cat 1)."""
    tpot_s: float = 0.0
    """> 0: override the class file's TPOT, seconds."""
    ttft_s: float = 0.0
    """> 0: override the class file's TTFT, seconds."""

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError("class weight must be >= 0")
        if self.acceptance not in REGIMES:
            raise ValueError(f"acceptance regime {self.acceptance!r} not one of {sorted(REGIMES)}")


class SingleSpec(_ClassBase, tag="single"):
    """One request per arrival."""

    slo_class: str
    """Name in the SLO class file."""
    prompt: LengthDist
    output: LengthDist


class ToolCallingSpec(_ClassBase, tag="tool_calling"):
    """A multi-call agent loop (closed loop: each call waits for the previous one + tool delay)."""

    slo_class: str = "tool-call"
    """Class of the intermediate calls (tight)."""
    final_slo_class: str = "tool-final"
    """Class of the final answer (loose)."""
    system_prompt: LengthDist = LengthDist(dist="uniform", low=1500, high=4000)
    """Shared system + tool-schema prefix; drawn once per workload (all sessions share it)."""
    user_prompt: LengthDist = LengthDist(mu=5.0, sigma=0.8, max=2000)
    tool_result: LengthDist = LengthDist(mu=5.5, sigma=1.0, max=2000)
    call_output: LengthDist = LengthDist(mu=4.1, sigma=0.5, min=30, max=150)
    """Intermediate call output (function-call JSON), tokens; median ~60."""
    final_output: LengthDist = LengthDist(dist="uniform", low=150, high=300)
    continue_p: float = 0.35
    """Calls = 1 + Geometric(continue_p) failures-before-success, truncated at max_calls."""
    max_calls: int = 8
    tool_delay_s: LengthDist = LengthDist(mu=math.log(0.3), sigma=1.5, min=0.01, max=30.0)
    """Tool latency between calls, seconds (log-normal, median 300 ms, p90 ~2 s)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.continue_p <= 1 or self.max_calls < 1:
            raise ValueError("continue_p must be in (0, 1] and max_calls >= 1")


class ReasoningSpec(_ClassBase, tag="reasoning"):
    """One request whose stream is a think stage then an answer stage (two SLO stages)."""

    slo_class: str = "reasoning"
    prompt: LengthDist = LengthDist(dist="uniform", low=100, high=500)
    think: LengthDist = LengthDist(mu=7.3, sigma=0.8, max=16000)
    answer: LengthDist = LengthDist(dist="uniform", low=100, high=400)


ClassSpec = Union[SingleSpec, ToolCallingSpec, ReasoningSpec]


class WorkloadSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A workload file."""

    name: str
    description: str = ""
    rate: float = 2.0
    """Default mean arrival rate, arrivals (sessions) per second."""
    duration_s: float = 60.0
    """Default arrival window, seconds."""
    arrival: ArrivalSpec = ArrivalSpec()
    acceptance_sigma: float = 0.1
    """Per-request heterogeneity: sd of the Beta-distributed acceptance offset."""
    slo_classes: str = ""
    """SLO class file (relative to the repo root); empty = configs/slo_classes.yaml."""
    classes: list[ClassSpec]

    def __post_init__(self) -> None:
        if not self.classes or sum(c.weight for c in self.classes) <= 0:
            raise ValueError(f"workload {self.name!r}: needs classes with positive total weight")
        if self.rate <= 0 or self.duration_s <= 0:
            raise ValueError("rate and duration_s must be positive")


class GenRequest(msgspec.Struct, kw_only=True):
    """One generated request (an LLM call)."""

    rid: str
    arrival_s: float
    """Arrival time, seconds from the start; for a dependent call, its nominal time (unused)."""
    prompt_tokens: int
    output_tokens: int
    """True output length (the request stops there)."""
    max_new_tokens: int = 0
    """What the client asks for (>= output_tokens; the class's length cap). 0 = output_tokens."""
    slo: Slo
    alphas: list[float]
    """True per-position conditional acceptance."""
    session_id: str = ""
    after_rid: str = ""
    """Closed loop: arrives only after this request finished (+ `delay_s`); '' = open loop."""
    delay_s: float = 0.0
    """Tool delay after `after_rid` finished, seconds."""
    prefix_tokens: int = 0
    """Leading prompt tokens that are cacheable: the previous call's full context (later calls)
    or the app's shared system/tool prefix (first calls, see `shared_prefix`)."""
    shared_prefix: str = ""
    """Key of an app-wide prefix that `prefix_tokens` refers to ('' = the session's own context)."""
    stage_tokens: list[int] = []
    """True output tokens per SLO stage (reasoning: [think, answer]); [] = one stage."""


class Workload(msgspec.Struct, kw_only=True):
    name: str
    rate: float
    duration_s: float
    seed: int
    requests: list[GenRequest]


def save_workload(w: Workload, path: str | Path) -> None:
    """Write a generated workload as JSON (replayable by the real HTTP evaluation)."""
    Path(path).write_bytes(msgspec.json.encode(w))


def load_workload(path: str | Path) -> Workload:
    """Read a workload written by `save_workload`; ValueError on bad input."""
    try:
        return msgspec.json.decode(Path(path).read_bytes(), type=Workload)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ValueError(f"cannot read workload {path}: {e}") from None


def load_workload_spec(name_or_path: str) -> WorkloadSpec:
    """A workload by name (configs/workloads/NAME.yaml) or path; ValueError on bad input."""
    path = Path(name_or_path)
    if not path.suffix:
        path = WORKLOAD_DIR / f"{name_or_path}.yaml"
    try:
        return msgspec.convert(yaml.safe_load(path.read_text()), WorkloadSpec)
    except FileNotFoundError:
        known = sorted(p.stem for p in WORKLOAD_DIR.glob("*.yaml"))
        raise ValueError(f"workload {name_or_path!r} not found (known: {known})") from None
    except (yaml.YAMLError, msgspec.ValidationError, ValueError, TypeError) as e:
        raise ValueError(f"bad workload file {path}: {e}") from None


class _Ctx:
    """Per-generation constants and the one random stream."""

    def __init__(self, spec: WorkloadSpec, seed: int, max_context: int, unloaded_tpot_s: float,
                 classes: dict[str, SloClass]):
        self.spec, self.rng, self.max_context = spec, np.random.default_rng(seed), max_context
        self.scale = min(1.0, max_context / FULL_SCALE_CONTEXT)
        self.unloaded_tpot_s, self.classes = unloaded_tpot_s, classes

    def tokens(self, d: LengthDist) -> int:
        return max(1, int(round(d.sample(self.rng) * self.scale)))

    def slo(self, c: _ClassBase, name: str) -> Slo:
        if name not in self.classes:
            raise ValueError(f"SLO class {name!r} not in the class file (known: {sorted(self.classes)})")
        slo = self.classes[name].to_slo(name)
        tpot = c.tpot_s or (c.tpot_baseline_multiplier * self.unloaded_tpot_s if c.tpot_baseline_multiplier else 0)
        if tpot:
            if c.tpot_baseline_multiplier and self.unloaded_tpot_s <= 0:
                raise ValueError("tpot_baseline_multiplier needs the hardware's unloaded TPOT")
            slo.tpot_s = tpot
        if c.ttft_s:
            slo.ttft_s = c.ttft_s
        return slo

    def alphas(self, c: _ClassBase) -> list[float]:
        return request_alphas(c.acceptance, c.acceptance_shift, self.spec.acceptance_sigma, self.rng)

    def cap(self, prompt: int, output: int, *dists: LengthDist) -> int:
        """max_new_tokens: the distributions' upper clips (4096 if unbounded), within the context."""
        cap = sum(d.upper for d in dists) * self.scale
        return max(output, min(int(cap), self.max_context - prompt))

    def fit(self, prompt: int, output: int) -> tuple[int, int]:
        """Clip a call to the model context (prompt at most 3/4 of it, output the rest)."""
        prompt = min(prompt, self.max_context * 3 // 4)
        return prompt, max(1, min(output, self.max_context - prompt))


def generate(spec: WorkloadSpec, *, rate: float | None = None, duration_s: float | None = None,
             seed: int = 0, max_context_tokens: int = 32768, unloaded_tpot_s: float = 0.0,
             slo_classes: dict[str, SloClass] | None = None) -> Workload:
    """Draw a workload. `unloaded_tpot_s`: the hardware's unloaded TPOT (for baseline-relative SLOs)."""
    rate = spec.rate if rate is None else rate
    duration_s = spec.duration_s if duration_s is None else duration_s
    if max_context_tokens < 8:
        raise ValueError("max_context_tokens must be >= 8")
    if slo_classes is None:
        slo_classes = load_slo_classes(spec.slo_classes or DEFAULT_SLO_PATH)
    ctx = _Ctx(spec, seed, max_context_tokens, unloaded_tpot_s, slo_classes)
    times = arrival_times(spec.arrival, rate, duration_s, ctx.rng)
    weights = np.array([c.weight for c in spec.classes], dtype=float)
    picks = ctx.rng.choice(len(spec.classes), size=len(times), p=weights / weights.sum())
    system_prompts = {i: ctx.tokens(c.system_prompt) for i, c in enumerate(spec.classes)
                      if isinstance(c, ToolCallingSpec)}  # one shared prefix per app
    out: list[GenRequest] = []
    for n, (t, k) in enumerate(zip(times, picks)):
        c = spec.classes[k]
        if isinstance(c, ToolCallingSpec):
            out.extend(_tool_session(ctx, c, n, float(t), system_prompts[k], f"{spec.name}/class{k}"))
        elif isinstance(c, ReasoningSpec):
            out.append(_reasoning(ctx, c, n, float(t)))
        else:
            prompt, output = ctx.fit(ctx.tokens(c.prompt), ctx.tokens(c.output))
            out.append(GenRequest(rid=f"r{n:05d}", arrival_s=float(t), prompt_tokens=prompt,
                                  output_tokens=output, max_new_tokens=ctx.cap(prompt, output, c.output),
                                  slo=ctx.slo(c, c.slo_class), alphas=ctx.alphas(c)))
    return Workload(name=spec.name, rate=rate, duration_s=duration_s, seed=seed, requests=out)


def _tool_session(ctx: _Ctx, c: ToolCallingSpec, n: int, t: float, system: int, app: str) -> list[GenRequest]:
    calls = min(int(ctx.rng.geometric(c.continue_p)), c.max_calls)  # 1 + failures before success
    session = f"s{n:05d}"
    prompt = system + ctx.tokens(c.user_prompt)
    out: list[GenRequest] = []
    for k in range(calls):
        final = k == calls - 1
        output = ctx.tokens(c.final_output if final else c.call_output)
        result = 0 if final else ctx.tokens(c.tool_result)  # what the tool will return
        if not final and prompt + output + result > ctx.max_context:
            final, output = True, ctx.tokens(c.final_output)  # context full: answer now
        prompt, output = ctx.fit(prompt, output)
        prev = out[-1] if out else None
        out.append(GenRequest(
            rid=f"{session}-c{k}", arrival_s=t, prompt_tokens=prompt, output_tokens=output,
            max_new_tokens=ctx.cap(prompt, output, c.final_output if final else c.call_output),
            slo=ctx.slo(c, c.final_slo_class if final else c.slo_class), alphas=ctx.alphas(c),
            session_id=session, after_rid=prev.rid if prev else "",
            delay_s=c.tool_delay_s.sample(ctx.rng) if prev else 0.0,
            prefix_tokens=(prev.prompt_tokens + prev.output_tokens) if prev else min(system, prompt),
            shared_prefix="" if prev else app))
        if final:
            break
        prompt = prompt + output + result
    return out


def _reasoning(ctx: _Ctx, c: ReasoningSpec, n: int, t: float) -> GenRequest:
    prompt = ctx.tokens(c.prompt)
    think, answer = ctx.tokens(c.think), ctx.tokens(c.answer)
    prompt, total = ctx.fit(prompt, think + answer)
    if total < think + answer:  # context-limited: shrink both stages proportionally
        think = max(1, think * total // (think + answer))
        answer = max(1, total - think)
    stages = [think, answer]
    return GenRequest(rid=f"r{n:05d}", arrival_s=t, prompt_tokens=prompt, output_tokens=sum(stages),
                      max_new_tokens=ctx.cap(prompt, sum(stages), c.think, c.answer),
                      slo=ctx.slo(c, c.slo_class), alphas=ctx.alphas(c), stage_tokens=stages)
