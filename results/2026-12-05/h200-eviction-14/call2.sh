#!/usr/bin/env bash
# Session 14, second machine (the first was taken back mid-call; none came after): the bundle's
# last part, the scoring kernel's cost with its new tiles, the Triton stream prefill against its
# reference, the FULL-graph DMS oracle (short prompts now replay; its Triton engine prefills with
# the new kernel), then a profile of dms-4x's decode steps at the decode-heavy batch (320 x 2048).
#   COMMIT=<sha> END_S=<seconds this call may run> bash results/2026-12-05/h200-eviction-14/call2.sh
set -u
t0=$(date +%s)
bash .gpu-bundle/part4/unpack.sh
source benchmarks/gpu_env.sh
echo "commit ${COMMIT:-unset}" | tee $OUT/commit.txt; nvidia-smi -L
timeout -k 5 40 python3 -m benchmarks.predictor_cost --device cuda --kinds kvzap-linear dms --repeats 30 \
  --out $OUT/predictor 2>&1 | cut -c1-200
timeout -k 5 60 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_stream_prefill_triton.py 2>&1 | tail -2
timeout -k 5 60 python3 -m benchmarks.kernels_stream_prefill --out $OUT/prefill 2>&1 | tail -4 | cut -c1-200
bash benchmarks/gpu_oracles.sh $OUT/ev 150 "ring_stream and dms and full"
left=$(( ${END_S:-420} - ($(date +%s) - t0) - 10 ))
echo "profile limit ${left}s"
if [ $left -gt 150 ]; then
  python3 -m benchmarks.gpu_engine --out /tmp/prof --workload profile --configs dms-4x --config-timeout $left \
    --profile --profile-shape 320,2048 > $OUT/prof.out 2>&1
  mkdir -p $OUT/prof; cp /tmp/prof/profile-*.txt /tmp/prof/rows.jsonl /tmp/prof/*.log $OUT/prof/ 2>/dev/null
  grep -E "ROW|PARTIAL" /tmp/prof/dms-4x.log | tail -1 | cut -c1-1200; head -30 $OUT/prof/profile-dms-4x.txt | cut -c1-200
fi
echo "call $(( $(date +%s)-t0 ))s"
