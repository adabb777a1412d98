"""Scheduling policies behind one interface; build them by name with `make_policy`."""

from sidecar.policies.base import PlanContext, Policy, build_config, make_policy, policy_names, register_policy

__all__ = ["PlanContext", "Policy", "build_config", "make_policy", "policy_names", "register_policy"]
