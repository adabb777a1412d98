"""sglang-slo: multi-SLO LLM serving as an SGLang extension plus a planner sidecar."""

__version__ = "0.1.0"
