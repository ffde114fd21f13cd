"""Time of the kvquant decode op (``kvquant_ref.decode_attention``, the CPU path of the `safe`
and `balanced` presets) per layer call, at Qwen2.5-Coder-0.5B's shape: 14 query / 2 KV heads,
head_dim 64, 8-bit keys and values, one request of ``--rows`` kept rows at scattered positions.

    python -m benchmarks.kvquant_op --rows 1400 --threads 2

Prints the median of ``--rounds`` rounds of ``--calls`` calls, in ms per call."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vllm_kvcompress.kernels import kvquant_ref

Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK, THETA = 14, 2, 64, 16, 1e6


def case(rows: int, key_bits: int = 8, value_bits: int = 8):
    generator = torch.Generator().manual_seed(0)
    layout = kvquant_ref.layout(HEAD_DIM, key_bits, value_bits, torch.bfloat16, positions=True)
    key, value = (torch.randn(rows, KV_HEADS, HEAD_DIM, generator=generator) for _ in range(2))
    positions = torch.randperm(3 * rows, generator=generator)[:rows].sort().values
    ranges = torch.stack([key.amin(0) - 1, key.amax(0) + 1], 1)  # [Hkv, 2, D]
    encoded = kvquant_ref.encode_rows(key, value, positions, ranges, key_bits, THETA, layout)
    blocks = -(-rows // BLOCK)
    flat = torch.zeros(blocks * BLOCK, KV_HEADS, encoded.shape[-1], dtype=torch.uint8)
    flat[:rows] = encoded
    cache = flat.view(blocks, BLOCK, KV_HEADS, -1).permute(0, 2, 1, 3).contiguous()  # [blocks, Hkv, bs, bytes]
    query = torch.randn(1, Q_HEADS, HEAD_DIM, generator=generator).to(torch.bfloat16)
    return (query, cache, torch.arange(blocks)[None], torch.tensor([rows]), ranges, key_bits, THETA, layout,
            HEAD_DIM ** -0.5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if min(args.rows, args.threads, args.calls, args.rounds) < 1:
        parser.error("--rows, --threads, --calls and --rounds must be at least 1")
    torch.set_num_threads(args.threads)
    inputs = case(args.rows)
    for _ in range(20):
        kvquant_ref.decode_attention(*inputs)
    rounds = []
    for _ in range(args.rounds):
        started = time.perf_counter()
        for _ in range(args.calls):
            kvquant_ref.decode_attention(*inputs)
        rounds.append(1000 * (time.perf_counter() - started) / args.calls)
    print(f"kvquant decode, {args.rows} rows, {args.threads} threads: {statistics.median(rounds):.3f} ms per call "
          f"(rounds: {', '.join(f'{r:.3f}' for r in rounds)})")


if __name__ == "__main__":
    main()
