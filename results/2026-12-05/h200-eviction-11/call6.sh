#!/usr/bin/env bash
# Device call 6 (same warm machine as call 5): the first compiled dms-4x row, then the predictors'
# share of a B=32 step against this machine's kvzap-4x / dms-4x rows (the <= 2% goal).
set -u
source benchmarks/gpu_env.sh
CONFIG=dms-4x LIMIT=${DMS_LIMIT:-290} bash results/2026-12-04/h200-eviction-9/call5.sh
timeout -k 5 90 python3 -m benchmarks.predictor_cost --device cuda --summary /tmp/full/summary.json --out $OUT/predictor
(cd /tmp && tar czf $OUT/full-all.tgz full)
