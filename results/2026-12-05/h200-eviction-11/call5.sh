#!/usr/bin/env bash
# Device call 5: the bf16 baseline and the first compiled dms-4x row on one machine, the full
# workload cut by each config's limit (bf16 262 s: start, capacity, decode-heavy and both TPOTs;
# its long-context part, measured four sessions running, is left out), then the predictors'
# share of a B=32 step against this machine's rows (the <= 2% goal). Rows gather in /tmp/full.
set -u
source benchmarks/gpu_env.sh
for spec in vllm-bf16:${BF16_LIMIT:-262} dms-4x:${DMS_LIMIT:-290}; do
  CONFIG=${spec%%:*} LIMIT=${spec##*:} bash results/2026-12-04/h200-eviction-9/call5.sh
done
[ -n "${SKIP_PREDICTOR:-}" ] || timeout -k 5 40 python3 -m benchmarks.predictor_cost --device cuda --summary /tmp/full/summary.json --out $OUT/predictor
