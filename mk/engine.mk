# Embedded engine benchmarks (engine component). Print JSON; no timed assertions.
.PHONY: bench-engine bench-engine-sglang-shape profile-cpu-tiny gpu-check

# Throughput with/without speculation on the tiny pair (single stream, 8 and 32 concurrent).
bench-engine: install
	$(PY) -m sglang_slo.cli bench-engine --json

# Same shape as the model SGLang served on this machine (2 layers, hidden 256, vocab 4096).
bench-engine-sglang-shape: install
	$(PY) -m sglang_slo.cli bench-engine --random-model 2,256,1024,4,4096 --json

# Measured cost-model profile of the tiny pair -> configs/hardware/cpu-tiny.yaml.
profile-cpu-tiny: install
	$(PY) -c "from sglang_slo.engine.train_tiny import ensure_tiny_pair; print(ensure_tiny_pair())" > /dev/null
	$(PY) -m sglang_slo.cli profile --model sglang_slo/assets/tiny/target --draft sglang_slo/assets/tiny/draft \
		--out configs/hardware/cpu-tiny.yaml

# On a machine with CUDA: GPU tests, engine CPU tests, bench-engine on CUDA (fp32/bf16), bf16
# spec-vs-plain agreement, bench-planner, a CUDA profile; JSON + one log in $OUT or
# results/gpu-check (see scripts/gpu_check.sh). Uses the machine's python3 (PYTHON=... to change).
gpu-check:
	scripts/gpu_check.sh
