"""On the device: run (or resume) the three DMS runs inside this call's time, in chunks that end on saves.

    python3 drive.py MODEL_DIR TEXTS_JSON RUNS_DIR OUT DEADLINE_EPOCH
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

model, texts, runs_dir, out, deadline = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), float(sys.argv[5])
timing = json.loads(Path("/tmp/steptime.json").read_text())
seq, step_time = timing["seq"], timing["step_time"]
overhead = 40.0  # process start + model load + end-of-run save/plot, refined after each invocation
RUNS = [("cr2", 2, 150), ("cr4", 4, 250), ("cr8", 8, 450)]


def current(d: Path) -> int:
    f = d / "state.json"
    return json.loads(f.read_text())["step"] if f.is_file() else 0


def collect():
    for name, _, total in RUNS:
        d = runs_dir / name
        if current(d) == total and (d / "training.json").is_file():
            (out / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(d / f"adapters-step{total}.safetensors", out / name)
            shutil.copy(d / "training.json", out / name)


for name, ratio, total in RUNS:
    d = runs_dir / name
    while (cur := current(d)) < total:
        avail = deadline - time.time() - overhead
        n = int(avail / (step_time * 1.05))
        target = total if n >= total - cur else cur + (n // 50) * 50
        if target <= cur:
            print(f"[drive] {name}: stopping at step {cur}/{total}, {deadline - time.time():.0f}s left in this call", flush=True)
            collect()
            sys.exit(0)
        cmd = [sys.executable, "-m", "vllm_kvcompress.offline.dms_train", "--model", model, "--out", str(d), "--device", "cuda",
               "--texts", texts, "--seq", str(seq), "--window", "128", "--lr", "1e-4", "--steps-per-ratio", "50",
               "--save-every", "50", "--max-ratio", str(ratio), "--steps", str(target)]
        print(f"[drive] {name}: steps {cur} -> {target} (step time {step_time:.3f}s)", flush=True)
        t = time.time()
        env = dict(os.environ, TQDM_MININTERVAL="20")
        try:
            rc = subprocess.call(cmd, env=env, timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            rc = 124
        took = time.time() - t
        print(f"[drive] {name}: rc {rc}, {took:.0f}s for {target - cur} steps", flush=True)
        if rc:
            collect()
            sys.exit(rc)
        # Refine per-step time from the long invocations.
        if target - cur >= 50:
            step_time = max(step_time, (took - 20.0) / (target - cur))
            overhead = max(20.0, took - step_time * (target - cur))
        log = json.loads((d / "training.json").read_text())["log"]
        print(f"[drive] {name}: last {log[-1]}", flush=True)
collect()
print("[drive] all runs done", flush=True)
