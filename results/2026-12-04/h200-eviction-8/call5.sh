#!/usr/bin/env bash
# Device call 5: the stream oracles (plan changed in 9643e6a) and the host profile after the plan cut.
set -u
source benchmarks/gpu_env.sh
mkdir -p $OUT/c5
bash benchmarks/gpu_oracles.sh $OUT/c5/ev 150 "ring_stream or headkv and eager"
for c in kvzap-4x dms-4x; do
  t0=$(date +%s)
  timeout -k 5 ${HOST_LIMIT:-110} python3 -m benchmarks.gpu_host_profile --config $c --batch 64 --context 1024 --tokens 24 --out $OUT/c5/host > $OUT/c5/host-$c.log 2>&1
  echo "host $c rc=$? $(( $(date +%s)-t0 ))s"; grep -E "ms_per_decode_step|ms per" $OUT/c5/host-$c.log | tail -3
done
(cd $OUT && tar czf c5.tgz c5 && rm -rf c5)
