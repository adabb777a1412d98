"""The policy interface: a policy turns the planner's state into one `Plan`.

A policy is pure: it reads `PlanContext` and returns a `protos.Plan`; it performs no I/O.
The `Planner` stamps `step`, `valid_until_s`, `plan_latency_s` and `based_on_step`, and
applies the plan's admission decisions to its state, so a policy only decides.

Contract every policy keeps (tests/test_sidecar_policies_invariants.py checks fcfs/priority):
- sum(prefill chunk tokens) + len(decode) <= token_budget;
- every running (admitted, fully prefilled) request has a decode entry with tree_cap >= 1,
  unless the same plan preempts it (Decision.PREEMPT), or the plan is prefill-only
  (prefill chunks, no decode entries at all: SGLang's default non-mixed prefill iteration,
  in which running requests wait);
- no chunk exceeds the request's remaining prefill; chunks only for admitted requests or
  requests admitted in the same plan;
- an admitted running request is never DEFERred or REJECTed.

Registry: `make_policy(name, **overrides)`. Built-ins: fcfs, fcfs_mixed, priority. The others live in
modules `sidecar.policies.<name>` (imported on first use) that define
`make(**overrides) -> Policy`; or any code may call `register_policy(name, factory)`.
"""

from __future__ import annotations

import dataclasses
import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from protos import messages as protos
from sidecar.acceptance import AcceptanceModel
from sidecar.cost_model import CostModel
from sidecar.state import PlannerState


@dataclass(slots=True)
class PlanContext:
    """Everything a policy may read to plan one iteration."""

    state: PlannerState
    """Requests and engine state (read-only for policies)."""
    cost: CostModel
    """Iteration-time model (seconds)."""
    acceptance: AcceptanceModel
    """Per-request speculative acceptance estimates."""
    now_s: float
    """Current time on the engine clock, seconds."""
    step: int = 0
    """Engine step the plan is for (the engine is already running step - 1)."""

    @property
    def limits(self):
        return self.state.limits


class Policy(ABC):
    """Decides one iteration's budget, admissions, prefill chunks and speculation."""

    name: str = "policy"

    @abstractmethod
    def plan(self, ctx: PlanContext) -> protos.Plan:
        """Return the plan for `ctx.step` (step/valid_until_s may be left 0; the Planner stamps them)."""

    def observe(self, msg: protos.Message) -> None:
        """Optional: see every engine message after the planner state applied it."""

    def reset(self) -> None:
        """Optional: forget internal state (the planner's state was replaced by a Resync)."""


Factory = Callable[..., Policy]

_REGISTRY: dict[str, Factory] = {}
# name -> module that defines `make(**overrides) -> Policy` (imported on first use)
_LAZY: dict[str, str] = {
    "fcfs": "sidecar.policies.fcfs",
    "fcfs_mixed": "sidecar.policies.fcfs_mixed",
    "priority": "sidecar.policies.priority",
    "specserve": "sidecar.policies.specserve",
    "adaserve": "sidecar.policies.adaserve",
    "slos_serve": "sidecar.policies.slos_serve",
    "slo_unified": "sidecar.policies.slo_unified",
}


def register_policy(name: str, factory: Factory) -> None:
    """Make `make_policy(name, **overrides)` call `factory(**overrides)`."""
    _REGISTRY[name] = factory


def policy_names() -> list[str]:
    """Every name make_policy knows (buildable or not)."""
    return sorted(set(_REGISTRY) | set(_LAZY))


def make_policy(name: str, **overrides: Any) -> Policy:
    """Build a policy by name; overrides are its config fields. Clear errors on bad input."""
    factory = _REGISTRY.get(name)
    if factory is None:
        module_name = _LAZY.get(name)
        if module_name is None:
            raise ValueError(f"unknown policy {name!r}; known: {', '.join(policy_names())}")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            raise ValueError(f"policy {name!r} is not available: module {module_name} does not exist yet") from None
        factory = getattr(module, "make", None)
        if factory is None:
            raise ValueError(f"policy {name!r}: module {module_name} defines no make(**overrides)")
        _REGISTRY[name] = factory
    return factory(**overrides)


C = TypeVar("C")


def build_config(config_cls: type[C], overrides: dict[str, Any], policy: str) -> C:
    """Config dataclass from overrides, with a clear error naming unknown fields."""
    names = {f.name for f in dataclasses.fields(config_cls)}  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"policy {policy!r}: unknown option(s) {unknown}; known: {sorted(names)}")
    return config_cls(**overrides)
