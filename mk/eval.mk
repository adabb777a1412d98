# Real HTTP evaluation (the "harness"): load client / trace replay tests and the served comparison.
.PHONY: test-harness demo-serve bench-client

test-harness: install
	$(PY) -m pytest -q tests/test_harness_*.py

# Real `sglang-slo serve` per policy on one mixed multi-SLO trace vs the simulator's prediction
# (a few minutes on 2 cores); writes results/served_demo.{json,md}.
SERVED_POLICIES ?= fcfs,slo_unified
demo-serve: install
	$(PY) -m eval.demo_serve --policies $(SERVED_POLICIES)

# Client timing accuracy and overhead against a fixed-TPOT SSE server (prints JSON).
bench-client: install
	$(PY) -m eval.bench_client
