"""Run a ``python -m MODULE SPEC.json OUT.json`` tool in a fresh process.

vLLM's CPU engine spawns processes and keeps global state, so every engine
configuration gets its own interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_module(module: str, spec: dict, timeout: int = 900) -> dict:
    """The tool's JSON result, plus its log (``log``) and wall time (``wall_s``, start-up included)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp, "spec.json"), Path(tmp, "out.json")
        spec_path.write_text(json.dumps(spec))
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", module, str(spec_path), str(out_path)],
            capture_output=True, text=True, timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{module} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        result = json.loads(out_path.read_text())
        result["log"] = proc.stderr + proc.stdout
        result["wall_s"] = time.perf_counter() - started
        return result
