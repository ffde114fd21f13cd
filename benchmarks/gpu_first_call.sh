#!/usr/bin/env bash
# The device call that brings the bundle's last part (parts 1-3 unpacked by the calls before it,
# back to back): unpack it, record the commit, run the stream checks (tests/test_gpu_streams.py),
# then the engine oracles chosen by ORACLES (a pytest -k expression; none if unset), each with
# ORACLE_LIMIT seconds (benchmarks/gpu_oracles.sh). Logs come back as $OUT/c4.tgz.
#   COMMIT=<sha> [ORACLES="compiled_learned and dms"] [ORACLE_LIMIT=300] bash benchmarks/gpu_first_call.sh
set -u
bash .gpu-bundle/part4/unpack.sh
source benchmarks/gpu_env.sh
echo "commit ${COMMIT:-unset: pass COMMIT=<sha>}" | tee $OUT/commit.txt; nvidia-smi -L
mkdir -p $OUT/c4
t0=$(date +%s)
timeout -k 5 90 python3 -m pytest -m gpu -rP -p no:cacheprovider tests/test_gpu_streams.py > $OUT/c4/streams.log 2>&1
echo "streams rc=$? $(( $(date +%s)-t0 ))s"; grep -E "passed|failed|Error" $OUT/c4/streams.log | tail -5
[ -z "${ORACLES:-}" ] || bash benchmarks/gpu_oracles.sh $OUT/c4/ev "${ORACLE_LIMIT:-300}" "$ORACLES"
echo "first call $(( $(date +%s)-t0 ))s"
(cd $OUT && tar czf c4.tgz c4 && rm -rf c4)
