# SGLang plugin (owner: plugin). SGLang 0.5.23 on CPU for tests, a CPU server with the plugin,
# and the side-by-side comparison. GPU launch: sglang_slo/sglang_plugin/README.md.
SGLANG_SHIM := tests/sglang_support/sgl_kernel_shim
SGLANG_TINY ?= results/sglang-tiny-llama
SGLANG_CPU_ENV := OMP_NUM_THREADS=1 SGLANG_USE_CPU_ENGINE=1 PYTHONPATH=$(SGLANG_SHIM)
SGLANG_PORT ?= 30000
SGLANG_POLICY ?= slo_unified

.PHONY: sglang-cpu sglang-cpu-check sglang-cpu-serve sglang-cpu-compare test-sglang

# Install SGLang 0.5.23 + its curated pure-Python deps (--no-deps: CPU torch stays), then the
# torchvision import bridge as a .pth hook, then verify torch/transformers were not touched.
$(VENV)/.sglang-cpu: requirements/sglang-cpu.txt tests/sglang_support/torchvision_bridge.py | $(VENV)/.installed
	$(PIP) install -q --no-deps -r requirements/sglang-cpu.txt
	SITE=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	  cp tests/sglang_support/torchvision_bridge.py $$SITE/sglang_slo_torchvision_bridge.py && \
	  echo "import sglang_slo_torchvision_bridge" > $$SITE/sglang_slo_torchvision_bridge.pth
	$(MAKE) --no-print-directory sglang-cpu-check
	touch $@

sglang-cpu: $(VENV)/.sglang-cpu

sglang-cpu-check:
	$(PY) -c "import torch, transformers, sglang; \
	assert torch.__version__ == '2.13.0+cpu', torch.__version__; \
	assert transformers.__version__ == '5.19.0', transformers.__version__; \
	assert sglang.__version__ == '0.5.23', sglang.__version__; \
	import transformers.models.llama, torchvision.transforms; \
	print('sglang', sglang.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"

# The plugin's tests (unit tests of every hook + the CPU end-to-end module).
test-sglang: sglang-cpu
	$(PY) -m pytest -q tests/test_sglang_*.py

# A real SGLang server on CPU serving a tiny Llama with the plugin and a planner sidecar.
sglang-cpu-serve: sglang-cpu
	$(PY) -c "from tests.sglang_support.tiny_llama import make_tiny_llama as m; m('$(SGLANG_TINY)')"
	$(SGLANG_CPU_ENV) $(PY) -m sglang_slo.sglang_plugin.launch --model $(SGLANG_TINY) --cpu \
	  --policy $(SGLANG_POLICY) --hardware tests/sglang_support/hardware-cpu-tiny-sglang.yaml \
	  --port $(SGLANG_PORT) -- --max-total-tokens 16384

# Side by side on CPU: SGLang's default scheduler vs SGLang + plugin + slo_unified (JSON).
sglang-cpu-compare: sglang-cpu
	$(SGLANG_CPU_ENV) $(PY) -m tests.sglang_support.compare --json
