#!/usr/bin/env bash
# Device call 4 of the next GPU session (after parts 1-3 were unpacked): the last bundle part, then
# the checks of what landed after h200-eviction-10 without a GPU run: stream prefill through
# FlashAttention (test_gpu_streams compares the CUDA streams with the CPU's SDPA), budget decodes
# that leave the host tables behind (HeadKV oracle under FULL graphs, async vs sync), and the host
# plan's cost on the H200's host (was 5.6 / 23.8 ms at B=64 / 320), and compiled KVzap (PIECEWISE) vs eager (DMS: call-dms.sh).
set -u
bash .gpu-bundle/part4/unpack.sh
source benchmarks/gpu_env.sh
echo "commit ${COMMIT:-unset: pass COMMIT=<sha>}" | tee $OUT/commit.txt; nvidia-smi -L
mkdir -p $OUT/c4
t0=$(date +%s)
timeout -k 5 120 python3 -m pytest -m gpu -rP -p no:cacheprovider tests/test_gpu_streams.py > $OUT/c4/streams.log 2>&1; echo "streams rc=$? $(( $(date +%s)-t0 ))s"
grep -E "passed|failed|Error" $OUT/c4/streams.log | tail -5
timeout -k 5 60 python3 -m benchmarks.stream_plan --device cuda --batch 64 320 --methods headkv > $OUT/c4/plan.log 2>&1; echo "plan rc=$?"; cat $OUT/c4/plan.log | tail -2
bash benchmarks/gpu_oracles.sh $OUT/c4/ev 180 "headkv and full or async and headkv or compiled_learned and kvzap"
(cd $OUT && tar czf c4.tgz c4 && rm -rf c4)
