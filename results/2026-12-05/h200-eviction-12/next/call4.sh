#!/usr/bin/env bash
# Device call 4 (after parts 1-3 were unpacked, back to back): the last bundle part, then
# test_gpu_streams after the device-made cumulative lengths (4 of 7 failed on 1cbcb17 at a host
# list copied to the device) and the compiled-DMS oracle with the time it lacked (130 s was not
# enough on 2026-12-05; it left no log).
set -u
bash .gpu-bundle/part4/unpack.sh
source benchmarks/gpu_env.sh
echo "commit ${COMMIT:-unset: pass COMMIT=<sha>}" | tee $OUT/commit.txt; nvidia-smi -L
mkdir -p $OUT/c4
t0=$(date +%s)
timeout -k 5 90 python3 -m pytest -m gpu -rP -p no:cacheprovider tests/test_gpu_streams.py > $OUT/c4/streams.log 2>&1; echo "streams rc=$? $(( $(date +%s)-t0 ))s"
grep -E "passed|failed|Error" $OUT/c4/streams.log | tail -5
bash benchmarks/gpu_oracles.sh $OUT/c4/ev ${DMS_ORACLE_LIMIT:-300} "compiled_learned and dms"
echo "call4 $(( $(date +%s)-t0 ))s"
(cd $OUT && tar czf c4.tgz c4 && rm -rf c4)
