# Simulator targets (owner: sim). Included by the Makefile.
.PHONY: simulate bench-sim

# All policies side by side on the mixed workload, simulated H100 (table).
simulate: install
	$(PY) -m sglang_slo.cli simulate --workload mixed --duration 30

# Simulator speed, in-process and over ZMQ (JSON).
bench-sim: install
	$(PY) -m eval.bench_sim
