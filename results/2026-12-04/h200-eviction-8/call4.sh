#!/usr/bin/env bash
# Device call 4 of session 8 (after parts 1-3 were unpacked): last bundle part, then the checks of
# the CUDA-path changes that landed without a GPU run (stream plan, ascending selection).
set -u
bash .gpu-bundle/part4/unpack.sh
source benchmarks/gpu_env.sh
echo "commit $COMMIT" | tee $OUT/commit.txt; nvidia-smi -L
mkdir -p $OUT/c4
t0=$(date +%s)
timeout -k 5 110 python3 -m benchmarks.compaction_tiles $OUT/c4/tiles.json > $OUT/c4/tiles.log 2>&1; echo "tiles rc=$? $(( $(date +%s)-t0 ))s"
tail -25 $OUT/c4/tiles.log
t0=$(date +%s)
timeout -k 5 170 python3 -m pytest -m gpu -rP -p no:cacheprovider tests/test_gpu_streams.py > $OUT/c4/streams.log 2>&1; echo "streams rc=$? $(( $(date +%s)-t0 ))s"
tail -5 $OUT/c4/streams.log
bash benchmarks/gpu_oracles.sh $OUT/c4/ev 150 "eviction and knorm and not lookat or frees_blocks"
(cd $OUT && tar czf c4.tgz c4 && rm -rf c4)
