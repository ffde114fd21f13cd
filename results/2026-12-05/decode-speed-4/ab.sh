#!/usr/bin/env bash
# A/B of the presets' CPU decode speed: the compiled CPU kvquant ops (KVCOMPRESS_KERNELS=auto,
# the default) against the eager PyTorch reference (KVCOMPRESS_KERNELS=reference), alternating,
# each run with bf16 (vLLM's own backend) in the same run. Run from the repository root.
set -euo pipefail
out=results/2026-12-05/decode-speed-4
for pair in 1 2; do
  for kind in auto reference; do
    KVCOMPRESS_KERNELS=$kind .venv/bin/python -m benchmarks.decode_speed --model qwen2.5-coder-0.5b \
      --configs preset-safe,preset-balanced,preset-max --batches 1 --output-tokens 64 --prompt-tokens 3072 \
      --out "$out/$kind$pair"
  done
done
