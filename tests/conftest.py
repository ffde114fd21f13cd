import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

REPO = Path(__file__).resolve().parents[1]

# Triton binds its own library (tl.zeros, tl.max, ...) to the interpreter only if
# TRITON_INTERPRET=1 is set when it is first imported; vLLM imports it too. Import it here, under
# the interpreter where there is no GPU, so the kernel tests run whatever order the test
# modules are collected in (triton_env restores the variable afterwards).
import triton_env  # noqa: E402

triton_env.import_kernels()


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The real test model (SmolLM2-135M-Instruct, bf16 safetensors), built offline from PyPI."""
    from vllm_kvcompress.offline.models import ensure_model

    return str(ensure_model("smollm2-135m"))


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable
