# Source on the GPU machine, in the repo root, once the bundle is complete (docs/gpu.md):
#   source benchmarks/gpu_env.sh
# vLLM from the bundle on PYTHONPATH; the plugin's entry points registered as a pip install
# would (pip cannot build the package there: no network for its build dependencies); the
# kernels folder where setup.py's package_dir puts it (vllm_kvcompress.kernels).
export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1
dist=/tmp/site/vllm_kvcompress-0.1.0.dist-info
mkdir -p "$dist"
printf 'Metadata-Version: 2.1\nName: vllm_kvcompress\nVersion: 0.1.0\n' > "$dist/METADATA"
printf '[vllm.general_plugins]\nkvcompress = vllm_kvcompress.vllm.plugin:register\n\n[vllm.stat_logger_plugins]\nkvcompress = vllm_kvcompress.vllm.metrics:KVCompressStatLogger\n' > "$dist/entry_points.txt"
ln -sfn "$PWD/kernels" vllm_kvcompress/kernels
