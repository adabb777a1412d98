# Simulator targets (owner: sim). Included by the Makefile.
.PHONY: simulate bench-sim ceiling

# All policies side by side on the mixed workload, simulated H100 (table).
simulate: install
	$(PY) -m sglang_slo.cli simulate --workload mixed --duration 30

# Simulator speed, in-process and over ZMQ (JSON).
bench-sim: install
	$(PY) -m eval.bench_sim

# Steady-state capacity ceilings of the mixed workload on the H100 profile, and what fcfs /
# slo_unified reach when giving up the heaviest class (JSON, ~5 min).
ceiling: install
	$(PY) -m eval.ceiling --workload mixed --hardware configs/hardware/h100-llama3.1-8b-eagle3.yaml \
		--policies fcfs,slo_unified --rates 18,27,36
