# Contract commands (see README): `make demo` and `make test` set everything up themselves.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo clean

# Component make fragments (benchmarks, optional installs) live in mk/*.mk.
-include mk/*.mk

# CPU torch is pinned to the local 2.13.0 wheel on machines without CUDA; an unpinned torch
# would pull the newest CUDA build (several GB).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q torch==2.13.0; fi
	$(PIP) install -q -e '.[dev,bench]'
	touch $@

install: $(VENV)/.installed

# The SGLang CPU set (mk/sglang.mk) is part of the test install: the plugin is tested against
# the real SGLang 0.5.23 classes and server.
test: install sglang-cpu
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m sglang_slo.cli demo

clean:
	rm -rf $(VENV) results .pytest_cache
