#!/usr/bin/env bash
# A device call on a warm machine (bundle complete): the rest of this batch's checks. The stream
# plan on the H200's host (budget decodes planned on the device, the graph-buffer copy), HeadKV's
# eager oracle and knorm's async-vs-sync test.
set -u
source benchmarks/gpu_env.sh
mkdir -p $OUT/rest
t0=$(date +%s)
timeout -k 5 60 python3 -m benchmarks.stream_plan --device cuda --batch 64 320 > $OUT/rest/plan.log 2>&1; echo "plan rc=$? $(( $(date +%s)-t0 ))s"
tail -4 $OUT/rest/plan.log
bash benchmarks/gpu_oracles.sh $OUT/rest/ev 160 "headkv and eager or async and knorm"
(cd $OUT && tar czf rest.tgz rest && rm -rf rest)
