#!/usr/bin/env bash
# Device call 4 of a GPU session (after parts 1-3 were unpacked): the last bundle part, then the
# checks of what landed without a GPU run that the headkv-4x row depends on: the stream runners
# on CUDA (budget decodes planned on the device, two staggered requests, the int32 warm-up),
# HeadKV's engine oracle under FULL decode graphs, and HeadKV under async scheduling.
set -u
bash .gpu-bundle/part4/unpack.sh
source benchmarks/gpu_env.sh
echo "commit ${COMMIT:-unset: pass COMMIT=<sha>}" | tee $OUT/commit.txt; nvidia-smi -L
mkdir -p $OUT/c4
t0=$(date +%s)
timeout -k 5 230 python3 -m pytest -m gpu -rP -p no:cacheprovider tests/test_gpu_streams.py > $OUT/c4/streams.log 2>&1; echo "streams rc=$? $(( $(date +%s)-t0 ))s"
grep -E "passed|failed|Error" $OUT/c4/streams.log | tail -5
bash benchmarks/gpu_oracles.sh $OUT/c4/ev 140 "headkv and full or async and headkv"
(cd $OUT && tar czf c4.tgz c4 && rm -rf c4)
