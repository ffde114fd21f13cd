#!/usr/bin/env bash
# Session 14, second machine (the first was taken back mid-call): the last part of the bundle,
# the scoring kernel's tiles and cost, the FULL-graph DMS oracle with prompts that pack, then
# dms-4x (decode modes and the decode-heavy prefill split) in whatever device time is left.
#   COMMIT=<sha> END_S=<seconds this call may run> bash results/2026-12-05/h200-eviction-14/call2.sh
set -u
t0=$(date +%s)
bash .gpu-bundle/part4/unpack.sh
source benchmarks/gpu_env.sh
echo "commit ${COMMIT:-unset}" | tee $OUT/commit.txt
timeout -k 5 80 python3 -m benchmarks.predictor_cost --device cuda --sweep-tiles --tokens 32 320 --repeats 20 \
  --out $OUT/predictor > $OUT/sweep.log 2>&1; echo "sweep rc=$? $(( $(date +%s)-t0 ))s"
grep '"chosen": true' $OUT/sweep.log; sort -t: -k8 -n $OUT/sweep.log | head -3
timeout -k 5 40 python3 -m benchmarks.predictor_cost --device cuda --kinds kvzap-linear dms --repeats 30 \
  2>&1 | grep '"auto"' | cut -c1-220
bash benchmarks/gpu_oracles.sh $OUT/ev 150 "ring_stream and dms and full"
left=$(( ${END_S:-540} - ($(date +%s) - t0) - 15 ))
echo "dms-4x limit ${left}s"
if [ $left -gt 200 ]; then
  python3 -m benchmarks.gpu_engine --out /tmp/full --workload full --configs dms-4x --config-timeout $left \
    --prefill-split > $OUT/dms.out 2>&1
  grep PARTIAL /tmp/full/dms-4x.log | tail -1 | cut -c1-900
  cp -r /tmp/full $OUT/full
fi
echo "call $(( $(date +%s)-t0 ))s"
