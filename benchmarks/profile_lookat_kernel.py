"""One LOOKAT decode launch and one dense decode launch at a Llama-3-8B shape, for Nsight Compute.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section WarpStateStats --section Occupancy --section LaunchStats -k regex:decode \\
        python3 -m benchmarks.profile_lookat_kernel [--batch 32] [--context 4096] [--m 16] [--bits 4] \\
            [--programs-per-sm 1 8]

Each op runs twice before the profiled region (compiles, warms the caches), then once per
listed ``programs_per_sm`` between ``cudaProfilerStart`` and ``Stop``, then the dense kernel.
Without ncu it prints the median time of each (CUDA-graph replays)."""

from __future__ import annotations

import argparse

import torch

from benchmarks.kernels_lookat import Shape, bench_ms
from vllm_kvcompress.kernels import lookat_triton


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--programs-per-sm", type=float, nargs="+", default=[1.0, 8.0])
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    shape = Shape("llama-3-8b", args.batch, args.context, "cuda", gen)
    layout, cache, codebooks = shape.lookat(args.m, args.bits, gen)
    ops = [(f"lookat pps={p}", shape.lookat_fn(layout, cache, codebooks, **{**lookat_triton.tuned(
        128, args.m, args.bits, args.batch), "programs_per_sm": p})) for p in args.programs_per_sm]
    ops.append(("dense", shape.dense_fn()))
    for _, fn in ops:
        fn(), fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for _, fn in ops:
        fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    for name, fn in ops:
        print(f"{name}: {1000 * bench_ms(fn, True):.1f} us (B={args.batch}, context {args.context}, m={args.m}, "
              f"{args.bits}-bit values)")


if __name__ == "__main__":
    main()
