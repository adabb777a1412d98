# HTTP server (owner: server): its tests, a manual launch, and sglang.bench_serving against it.
.PHONY: test-server serve bench-serving
SERVE_PORT ?= 30000
SERVE_POLICY ?= slo_unified
TINY_PAIR ?= $(shell $(PY) -c "from tests.server_support import tiny_pair; print(tiny_pair())" 2>/dev/null)

test-server: install
	$(PY) -m pytest -q tests/test_slo_*.py tests/test_server_*.py

serve: install
	$(PY) -m sglang_slo.cli serve --model $(TINY_PAIR)/target --draft $(TINY_PAIR)/draft \
	  --policy $(SERVE_POLICY) --port $(SERVE_PORT)

# SGLang's load client (needs `make sglang-cpu` + datasets) with --backend sglang-oai,
# sglang-oai-chat and sglang, with --goodput; prints and writes a JSON summary.
bench-serving: install
	$(PIP) install -q datasets "python-dateutil<3"
	$(PY) -m sglang_slo.server.bench_http --model $(TINY_PAIR)/target --draft $(TINY_PAIR)/draft \
	  --policy $(SERVE_POLICY) --out results/bench-serving.json
