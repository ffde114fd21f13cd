#!/usr/bin/env bash
# Device call 4 (after parts 1-3 were unpacked, back to back): the last bundle part, then the checks
# of what landed without a GPU: stream prefill through FlashAttention and budget decodes
# (test_gpu_streams: CUDA streams vs the CPU's), and compiled KVzap / DMS scores (buffered custom op)
# with PIECEWISE graphs vs --enforce-eager. HeadKV's FULL-graph oracle runs only if time is left.
set -u
bash .gpu-bundle/part4/unpack.sh
source benchmarks/gpu_env.sh
echo "commit ${COMMIT:-unset: pass COMMIT=<sha>}" | tee $OUT/commit.txt; nvidia-smi -L
mkdir -p $OUT/c4
t0=$(date +%s)
timeout -k 5 60 python3 -m pytest -m gpu -rP -p no:cacheprovider tests/test_gpu_streams.py > $OUT/c4/streams.log 2>&1; echo "streams rc=$? $(( $(date +%s)-t0 ))s"
grep -E "passed|failed|Error" $OUT/c4/streams.log | tail -5
bash benchmarks/gpu_oracles.sh $OUT/c4/ev 130 "${ORACLES:-compiled_learned and dms}"
if [ $(( $(date +%s)-t0 )) -lt 240 ]; then bash benchmarks/gpu_oracles.sh $OUT/c4/ev 140 "headkv and full"; fi
echo "call4 $(( $(date +%s)-t0 ))s"
(cd $OUT && tar czf c4.tgz c4 && rm -rf c4)
