set -u
cd /work/main
run() { timeout 900 .venv/bin/python -m benchmarks.decode_speed --model qwen2.5-coder-0.5b --configs preset-safe,preset-balanced,preset-max --batches 1 --output-tokens 64 --prompt-tokens 3072 --out /tmp/ab/$1 > /tmp/ab/$1.log 2>&1; }
before() { git show 418be23:kernels/rope_ref.py > kernels/rope_ref.py; git show 418be23:kernels/kvquant_ref.py > kernels/kvquant_ref.py; git show 418be23:kernels/paged_dense_ref.py > kernels/paged_dense_ref.py; git show 418be23:kernels/stream_attention_ref.py > kernels/stream_attention_ref.py; }
after() { git checkout -q HEAD -- kernels/; }
after; run after1
before; run before1
after; run after2
before; run before2
after
echo done > /tmp/ab/done
