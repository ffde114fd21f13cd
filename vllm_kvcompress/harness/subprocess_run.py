"""Both sides of the ``python -m MODULE SPEC.json OUT.json`` tool protocol.

vLLM's CPU engine spawns processes and keeps global state, so every engine
configuration gets its own interpreter: :func:`run_module` starts one, and a tool's
``__main__`` calls :func:`tool_main`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def tool_main(run: Callable[[dict], dict]) -> None:
    """Entry point of a tool: ``run(spec)`` on SPEC.json, its result to OUT.json."""
    import os

    # The tools inspect workers with collective_rpc(function), which vLLM only
    # pickles with this opt-in. They are local measurement tools, never servers.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    spec_path, out_path = sys.argv[1], sys.argv[2]
    result = run(json.loads(Path(spec_path).read_text()))
    Path(out_path).write_text(json.dumps(result, indent=2))


def failure_reason(message: str) -> str:
    """The exception line of a failed tool's output (not a trailing warning)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Exit)\b", line)]
    return (errors or lines or ["failed"])[-1][:300]


def run_module(module: str, spec: dict, timeout: int = 900, show_progress: bool = False) -> dict:
    """The tool's JSON result, plus its log (``log``) and wall time (``wall_s``, start-up included).

    ``show_progress`` passes the tool's stderr (its progress bar) through to ours; the
    log then holds stdout only."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp, "spec.json"), Path(tmp, "out.json")
        spec_path.write_text(json.dumps(spec))
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", module, str(spec_path), str(out_path)],
            stdout=subprocess.PIPE, stderr=None if show_progress else subprocess.PIPE,
            text=True, timeout=timeout,
        )
        stderr = proc.stderr or ""
        if proc.returncode != 0:
            raise RuntimeError(f"{module} failed (exit {proc.returncode}):\n{(stderr or proc.stdout)[-4000:]}")
        result = json.loads(out_path.read_text())
        result["log"] = stderr + proc.stdout
        result["wall_s"] = time.perf_counter() - started
        return result
