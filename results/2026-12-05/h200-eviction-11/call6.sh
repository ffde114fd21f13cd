#!/usr/bin/env bash
# Device call 6 (same warm machine as call 5, if device time is left): the first compiled
# kvzap-4x row, and the predictors' share again with it in the summary.
set -u
source benchmarks/gpu_env.sh
CONFIG=kvzap-4x LIMIT=${KVZAP_LIMIT:-290} bash results/2026-12-04/h200-eviction-9/call5.sh
timeout -k 5 40 python3 -m benchmarks.predictor_cost --device cuda --summary /tmp/full/summary.json --out $OUT/predictor
(cd /tmp && tar czf $OUT/full-all.tgz full)
