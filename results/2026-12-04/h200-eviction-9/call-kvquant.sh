#!/usr/bin/env bash
# A device call on a warm machine (bundle complete), after the headkv rows: the host plan on the
# H200's host, kvquant rows on CUDA (the kernel against its reference and inside a captured
# graph, timed against the dense bf16 kernel, the engine oracles), then the remaining oracles of
# this batch of changes (HeadKV eager, knorm async).
set -u
source benchmarks/gpu_env.sh
mkdir -p $OUT/kq
t0=$(date +%s)
timeout -k 5 60 python3 -m benchmarks.stream_plan --device cuda --batch 64 320 > $OUT/kq/plan.log 2>&1; echo "plan rc=$? $(( $(date +%s)-t0 ))s"
tail -4 $OUT/kq/plan.log
t0=$(date +%s)
timeout -k 5 120 python3 -m pytest -m gpu -rP -p no:cacheprovider tests/test_gpu_kvquant.py > $OUT/kq/kernel.log 2>&1; echo "kernel tests rc=$? $(( $(date +%s)-t0 ))s"
grep -E "relative error|passed|failed|Error" $OUT/kq/kernel.log | head -12
t0=$(date +%s)
timeout -k 5 120 python3 -m benchmarks.kernels_kvquant --out $OUT/kq/bench > $OUT/kq/bench.log 2>&1; echo "bench rc=$? $(( $(date +%s)-t0 ))s"
cat $OUT/kq/bench/results.md 2>/dev/null || tail -5 $OUT/kq/bench.log
bash benchmarks/gpu_oracles.sh $OUT/kq/ev 120 "kvquant or headkv and eager or async and knorm"
(cd $OUT && tar czf kq.tgz kq && rm -rf kq)
