#!/usr/bin/env bash
# Device calls 5 and 6: the full workload, one config per call (CONFIG, LIMIT), rows gathered in /tmp/full
# on the warm machine (gpu_engine rewrites the summary from every row there).
set -u
source benchmarks/gpu_env.sh
t0=$(date +%s)
python3 -m benchmarks.gpu_engine --out /tmp/full --workload full --configs $CONFIG --config-timeout $LIMIT > /tmp/full-$CONFIG.out 2>&1
echo "$CONFIG rc=$? $(( $(date +%s)-t0 ))s"; tail -3 /tmp/full-$CONFIG.out | cut -c1-600
cut -c1-700 /tmp/full/summary.md | tail -4
grep -i "graph\|compil" /tmp/full/$CONFIG.log | grep -v Dynamo | tail -5 | cut -c1-300
cp /tmp/full-$CONFIG.out /tmp/full/ ; (cd /tmp && tar czf $OUT/full-$CONFIG.tgz full)
