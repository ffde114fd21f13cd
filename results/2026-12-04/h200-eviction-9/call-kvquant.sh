#!/usr/bin/env bash
# A device call on a warm machine (bundle complete): kvquant rows on CUDA. The kernel against its
# reference and inside a captured graph, the kernel timed against the dense bf16 kernel, then the
# engine oracles (the tests set KVCOMPRESS_CUDA_KVQUANT=experimental).
set -u
source benchmarks/gpu_env.sh
mkdir -p $OUT/kq
t0=$(date +%s)
timeout -k 5 120 python3 -m pytest -m gpu -rP -p no:cacheprovider tests/test_gpu_kvquant.py > $OUT/kq/kernel.log 2>&1; echo "kernel tests rc=$? $(( $(date +%s)-t0 ))s"
grep -E "relative error|passed|failed|Error" $OUT/kq/kernel.log | head -12
t0=$(date +%s)
timeout -k 5 200 python3 -m benchmarks.kernels_kvquant --out $OUT/kq/bench > $OUT/kq/bench.log 2>&1; echo "bench rc=$? $(( $(date +%s)-t0 ))s"
cat $OUT/kq/bench/results.md 2>/dev/null || tail -5 $OUT/kq/bench.log
bash benchmarks/gpu_oracles.sh $OUT/kq/ev 120 "kvquant"
(cd $OUT && tar czf kq.tgz kq && rm -rf kq)
