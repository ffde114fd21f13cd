#!/usr/bin/env bash
# On the GPU machine, after `source benchmarks/gpu_env.sh` (docs/gpu.md): every GPU test in
# its own pytest process (a killed run prints no failure reports), each with its own limit,
# logs to ${1:-/tmp/oracles}/<test>.log and a one-line verdict per test on stdout.
#   bash benchmarks/gpu_oracles.sh [LOGDIR] [PER_TEST_SECONDS] [PYTEST -k EXPRESSION]
set -u
logs=${1:-/tmp/oracles}; limit=${2:-200}; select=${3:-}
mkdir -p "$logs"
ids=$(python3 -m pytest -m gpu --collect-only -q tests/test_gpu_engine.py ${select:+-k "$select"} | grep '::')
for t in $ids; do
  name=$(echo "${t#*::}" | tr -c 'A-Za-z0-9_.-' '_')
  start=$(date +%s)
  timeout -k 10 "$limit" python3 -m pytest -m gpu -rP -s -q -p no:cacheprovider "$t" >"$logs/$name.log" 2>&1
  rc=$?
  echo "rc=$rc $(( $(date +%s) - start ))s $t"
  grep -E "same greedy tokens|relative error|FAILED|Error|assert" "$logs/$name.log" | head -6
done
