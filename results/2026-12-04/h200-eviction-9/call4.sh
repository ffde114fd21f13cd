#!/usr/bin/env bash
# Device call 4 of session 9 (after parts 1-3 were unpacked): the last bundle part, then the checks
# of the CUDA-path changes that landed without a GPU run: the budget decodes planned on the device,
# the index_select gathers, HeadKV's stream decode replayed from FULL CUDA graphs, and HeadKV under
# async scheduling.
set -u
bash .gpu-bundle/part4/unpack.sh
source benchmarks/gpu_env.sh
echo "commit $COMMIT" | tee $OUT/commit.txt; nvidia-smi -L
mkdir -p $OUT/c4
t0=$(date +%s)
timeout -k 5 90 python3 -m benchmarks.stream_plan --device cuda --batch 64 320 > $OUT/c4/plan.log 2>&1; echo "plan rc=$? $(( $(date +%s)-t0 ))s"
tail -12 $OUT/c4/plan.log
t0=$(date +%s)
timeout -k 5 170 python3 -m pytest -m gpu -rP -p no:cacheprovider tests/test_gpu_streams.py > $OUT/c4/streams.log 2>&1; echo "streams rc=$? $(( $(date +%s)-t0 ))s"
tail -5 $OUT/c4/streams.log
bash benchmarks/gpu_oracles.sh $OUT/c4/ev 140 "headkv and (full or eager) or async"
(cd $OUT && tar czf c4.tgz c4 && rm -rf c4)
