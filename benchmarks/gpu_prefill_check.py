"""A chunk of a long prompt through the PyTorch prefill ops on a CUDA GPU: peak memory and time.

    python -m benchmarks.gpu_prefill_check [--context 32768] [--chunk 16384]

The chunk path (a query chunk after cached context) needs an explicit causal mask; with GQA
torch has no fused CUDA kernel for it, and its fallback materialises the score matrix. This
prints what one layer's chunk costs for the Llama-3-8B shape (dense and LOOKAT m16 rows).
"""

from __future__ import annotations

import argparse
import time

import torch

from vllm_kvcompress.kernels import lookat_ref, paged_dense_ref


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--chunk", type=int, default=16384)
    args = parser.parse_args()
    hq, hkv, d, bs = 32, 8, 128, 16
    blocks = torch.arange(args.context // bs, device="cuda")
    query = torch.randn(args.chunk, hq, d, device="cuda", dtype=torch.bfloat16)
    dense = torch.randn(args.context // bs, hkv, bs, 2 * d, device="cuda", dtype=torch.bfloat16)
    layout = lookat_ref.LookatLayout(head_dim=d, m=16, value_bits=4)
    coded = torch.randint(0, 255, (args.context // bs, hkv, bs, layout.row_bytes), device="cuda", dtype=torch.uint8)
    coded[..., layout.m + layout.value_bytes:] = 0  # fp16 scale / min = 0: finite values
    codebooks = torch.randn(hkv, 16, 256, d // 16, device="cuda")
    for name, run in {
        "dense": lambda: paged_dense_ref.prefill_attention(query, dense, blocks, args.context, d ** -0.5),
        "lookat-m16-v4": lambda: lookat_ref.prefill_attention(query, coded, blocks, args.context, codebooks, None,
                                                              layout, d ** -0.5),
    }.items():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        started = time.perf_counter()
        out = run()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        started = time.perf_counter()
        run()
        torch.cuda.synchronize()
        again = time.perf_counter() - started
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        print(f"{name}: chunk {args.chunk} over {args.context}: first {seconds * 1e3:.1f} ms, again "
              f"{again * 1e3:.1f} ms, peak +{peak:.2f} GiB, finite {bool(torch.isfinite(out).all())}", flush=True)


if __name__ == "__main__":
    main()
