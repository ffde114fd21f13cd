#!/usr/bin/env bash
# Device call 6 (second machine of the session; parts 1-3 unpacked by the calls before): the host
# plan for a CUDA pool (pinned tables), the stream checks, knorm-4x's B=32 profile (compaction share
# with the 16x1 key-norm tile and `ascending`).
set -u
bash .gpu-bundle/part4/unpack.sh
source benchmarks/gpu_env.sh
echo "commit $COMMIT" | tee $OUT/commit6.txt
mkdir -p $OUT/c6
t0=$(date +%s)
timeout -k 5 90 python3 -m benchmarks.stream_plan --device cuda --batch 64 320 --steps 20 --out $OUT/c6/plan > $OUT/c6/plan.log 2>&1
echo "plan rc=$? $(( $(date +%s)-t0 ))s"; grep '^{' $OUT/c6/plan.log
t0=$(date +%s)
timeout -k 5 60 python3 -m pytest -m gpu -rP -p no:cacheprovider tests/test_gpu_streams.py > $OUT/c6/streams.log 2>&1
echo "streams rc=$? $(( $(date +%s)-t0 ))s"; tail -1 $OUT/c6/streams.log
t0=$(date +%s)
timeout -k 5 ${PROFILE_LIMIT:-200} python3 -m benchmarks.gpu_engine --out $OUT/c6/knorm-b32 --workload quick --configs knorm-4x --profile --config-timeout $(( ${PROFILE_LIMIT:-200} - 10 )) > $OUT/c6/knorm-b32.log 2>&1
echo "knorm profile rc=$? $(( $(date +%s)-t0 ))s"; tail -4 $OUT/c6/knorm-b32/summary.md 2>/dev/null | cut -c1-900
(cd $OUT && tar czf c6.tgz c6 && rm -rf c6)
