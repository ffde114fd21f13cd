#!/usr/bin/env bash
# A device call after call4 (same warm machine): DMS compiled. Its adapters score through the
# buffered custom op since 2026-12-05 (CPU-tested): the compiled + PIECEWISE vs eager oracle,
# then the first compiled dms-4x full-workload row, gathered with the other rows in /tmp/full.
set -u
source benchmarks/gpu_env.sh
bash benchmarks/gpu_oracles.sh $OUT/dms-oracle 170 "compiled_learned and dms"
CONFIG=dms-4x LIMIT=${LIMIT:-380} bash results/2026-12-04/h200-eviction-9/call5.sh
# The predictors' share of a B=32 step, against the kvzap-4x / dms-4x rows of this machine (/tmp/full).
timeout -k 5 60 python3 -m benchmarks.predictor_cost --device cuda --summary /tmp/full/summary.json --out $OUT/predictor
