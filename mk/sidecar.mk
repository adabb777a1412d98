# Planner sidecar: tests and the plan-latency / round-trip benchmark (prints JSON).
.PHONY: test-sidecar bench-planner

test-sidecar: install
	$(PY) -m pytest -q tests/test_protos.py tests/test_sidecar_*.py

bench-planner: install
	$(PY) -m sglang_slo.cli bench-planner --json
