#!/usr/bin/env bash
# Host cost of the stream step plan before (OLD, a worktree at 1f18b8a) and after the lazy host
# tables and the single gather (this tree), alternating, on this machine. Run from the repo root:
#   git worktree add /tmp/kvc-old 1f18b8a && OLD=/tmp/kvc-old bash results/2026-12-05/stream-plan-2/ab.sh OUTDIR
set -eu
out=${1:?OUTDIR}; mkdir -p "$out"
for round in 1 2 3; do
  for side in old new; do
    root=$PWD; [ "$side" = old ] && root=$OLD
    (cd "$root" && PYTHONPATH="$root" "$OLDPWD/.venv/bin/python" "$OLDPWD/results/2026-12-05/stream-plan-2/meta_plan.py" --device meta --batch 64 320 --steps 20 --methods headkv) > "$out/$side-meta-$round.jsonl"
    (cd "$root" && PYTHONPATH="$root" "$OLDPWD/.venv/bin/python" -m benchmarks.stream_plan --device cpu --batch 64 320 --steps 20 --methods ring) > "$out/$side-ring-$round.jsonl"
  done
done
python3 - "$out" <<'PY'
import json, sys, statistics, pathlib
out = pathlib.Path(sys.argv[1])
for kind in ("meta", "ring"):
    for batch in (64, 320):
        med = {}
        for side in ("old", "new"):
            vals = [json.loads(l)["build_ms_per_step"] for f in sorted(out.glob(f"{side}-{kind}-*.jsonl"))
                    for l in f.read_text().splitlines() if json.loads(l)["batch"] == batch]
            med[side] = statistics.median(vals)
        label = "headkv, device plan (meta)" if kind == "meta" else "ring (DMS/KVzap threshold), host plan"
        print(f"| {label} | B={batch} | {med['old']:.1f} | {med['new']:.1f} | {med['old'] / med['new']:.2f}x |")
PY
