"""Every Python file in the project compiles under the interpreter CI runs. Benchmarks run
by command only, so a syntax error in one (a Python 3.12 f-string on 3.11 did it) would
otherwise surface only when someone runs it."""

from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SOURCES = sorted(p for folder in ("vllm_kvcompress", "kernels", "benchmarks", "tests") for p in (ROOT / folder).rglob("*.py"))


def test_there_are_sources():
    assert len(SOURCES) > 50


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_compiles(path):
    compile(path.read_text(), str(path), "exec")  # raises SyntaxError
