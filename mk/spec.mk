# Speculation kernels (sglang_slo/spec): tests and the speed benchmark (prints JSON).
.PHONY: test-spec bench-spec

test-spec: install
	$(PY) -m pytest -q tests/test_spec_select.py tests/test_spec_tree.py tests/test_spec_verify_greedy.py tests/test_spec_verify_sampling.py tests/test_spec_gpu.py

bench-spec: install
	$(PY) -m sglang_slo.spec.bench $(if $(DEVICE),--device $(DEVICE),)
