"""Run Triton kernels on CPU through Triton's interpreter in tests.

TRITON_INTERPRET=1 must be set while triton and the kernel modules are imported
(kernels are bound to the interpreter when decorated) and while each test runs; it is
restored in between so other tests (and the vLLM processes they start) do not inherit
it. Triton is a project dependency: a missing triton fails instead of skipping."""

import importlib
import os

import pytest
import torch

INTERP = not torch.cuda.is_available()
DEV = "cuda" if torch.cuda.is_available() else "cpu"
_SAVED = os.environ.get("TRITON_INTERPRET")


def _restore():
    if _SAVED is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _SAVED


def import_kernels(*names: str):
    """``vllm_kvcompress.kernels.<name>`` modules, imported under the interpreter on CPU."""
    if INTERP:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        importlib.import_module("triton")
        return [importlib.import_module(f"vllm_kvcompress.kernels.{name}") for name in names]
    finally:
        _restore()


@pytest.fixture
def interpreter():
    if INTERP:
        os.environ["TRITON_INTERPRET"] = "1"
    yield
    _restore()
