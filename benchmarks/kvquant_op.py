"""Time of the kvquant decode op on the CPU per layer call, the compiled twin
(``kvquant_cpu``, what the presets run) against the eager reference (``kvquant_ref``) in
the same run, at Qwen2.5-Coder-0.5B's shape: 14 query / 2 KV heads, head_dim 64, one
request of ``--rows`` kept rows at scattered positions in vLLM CPU's 128-token blocks.

    python -m benchmarks.kvquant_op --rows 1400 --threads 2 [--key-bits 4 --value-bits 4]

Prints the median of ``--rounds`` rounds of ``--calls`` calls, in ms per call, and the ratio."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vllm_kvcompress.kernels import kvquant_cpu, kvquant_ref

Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK, THETA = 14, 2, 64, 128, 1e6


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
    parser.add_argument("--key-bits", type=int, default=8, choices=kvquant_ref.KEY_BITS)
    parser.add_argument("--value-bits", type=int, default=8, choices=(16, 8, 4))
    args = parser.parse_args(argv)
    if min(args.rows, args.threads, args.calls, args.rounds) < 1:
        parser.error("--rows, --threads, --calls and --rounds must be at least 1")
    torch.set_num_threads(args.threads)
    inputs = case(args.rows, args.key_bits, args.value_bits)
    kvquant_cpu.warm_up(Q_HEADS, BLOCK, inputs[4], args.key_bits, THETA, inputs[7], inputs[8])
    timed = {"reference": kvquant_ref.decode_attention, "compiled": kvquant_cpu.decode_attention}
    error = (timed["compiled"](*inputs) - timed["reference"](*inputs)).abs().max().item()
    rounds = {name: [] for name in timed}
    for _ in range(args.rounds):  # alternating, so drift in the machine's speed hits both
        for name, op in timed.items():
            with torch.inference_mode():  # as vLLM steps run (the graphs the warm-up compiled)
                for _ in range(20):
                    op(*inputs)
                started = time.perf_counter()
                for _ in range(args.calls):
                    op(*inputs)
            rounds[name].append(1000 * (time.perf_counter() - started) / args.calls)
    median = {name: statistics.median(r) for name, r in rounds.items()}
    print(f"kvquant decode, {args.rows} rows, {args.key_bits}-bit keys, {args.value_bits}-bit values, "
          f"{args.threads} threads (max |compiled - reference| = {error:.1e}):")
    for name, r in rounds.items():
        print(f"  {name:9s} {median[name]:.3f} ms per call (rounds: {', '.join(f'{x:.3f}' for x in r)})")
    print(f"  compiled / reference = {median['compiled'] / median['reference']:.2f}")

if __name__ == "__main__":
    main()
