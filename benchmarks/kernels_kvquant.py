"""kvquant decode on a CUDA GPU: correctness against the PyTorch reference, then time per
layer call against the dense bf16 paged kernel (the cache it replaces) at the same shapes.

    python -m benchmarks.kernels_kvquant --out DIR [--quick]

Shapes: Llama-3-8B's attention (32 query / 8 KV heads, head_dim 128) and Qwen2.5-Coder-0.5B's
(14 / 2, head_dim 64), batches x contexts below; rows carry their logical positions (a cache
that evicts, as the presets' is); 8-bit keys and values (``safe``/``balanced``) and 4-bit
(``max``). Each cell times ``kvquant_triton.kvquant_decode`` and ``dense_triton.dense_decode``
with ``triton.testing.do_bench`` (median) in the same run and prints the ratio. Writes
``results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch

SHAPES = {"llama-3-8b": (32, 8, 128), "qwen2.5-coder-0.5b": (14, 2, 64)}
CELLS = [(1, 32768), (32, 4096), (64, 8192), (256, 1024)]
QUICK_CELLS = [(1, 4096), (32, 1024)]
BITS = [(8, 8), (4, 4)]
THETA, BLOCK = 500000.0, 16


def case(num_q_heads: int, num_kv_heads: int, head_dim: int, batch: int, context: int, key_bits: int,
         value_bits: int, device, seed: int = 0):
    """Both caches of one layer for ``batch`` requests of ``context`` rows in shuffled blocks."""
    from vllm_kvcompress.kernels import kvquant_ref

    gen = torch.Generator(device=device).manual_seed(seed)  # made on the GPU: GBs of rows at the large cells
    blocks_each = -(-context // BLOCK)
    num_blocks = batch * blocks_each
    layout = kvquant_ref.layout(head_dim, key_bits, value_bits, torch.bfloat16, positions=True)
    rows = num_blocks * BLOCK
    pre = torch.randn(rows, num_kv_heads, head_dim, generator=gen, device=device)
    ranges = torch.stack([pre.amin(0) - 0.5, pre.amax(0) + 0.5], 1)
    where = torch.randint(0, 4 * context, (rows,), generator=gen, device=device)  # logical positions, as after eviction
    values = torch.randn(rows, num_kv_heads, head_dim, generator=gen, device=device)
    # The random keys taken as turned to ``where`` (the codes' values do not change the timing).
    encoded = kvquant_ref.encode_rows(pre, values, where, ranges, key_bits, THETA, layout)
    packed = encoded.view(num_blocks, BLOCK, num_kv_heads, -1).transpose(1, 2).contiguous()
    dense = torch.randn(num_blocks, num_kv_heads, BLOCK, 2 * head_dim, generator=gen, device=device,
                        dtype=torch.bfloat16)
    table = torch.randperm(num_blocks, generator=gen, device=device).view(batch, blocks_each).int()
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    query = torch.randn(batch, num_q_heads, head_dim, generator=gen, device=device, dtype=torch.bfloat16)
    return {"layout": layout, "packed": packed, "dense": dense, "table": table, "lens": lens, "query": query,
            "ranges": ranges, "max_position": 4 * context}


def check(device) -> float:
    """Relative error of the Triton kernel against the reference on one small case."""
    from vllm_kvcompress.kernels import kvquant_ref, kvquant_triton

    c = case(8, 2, 64, 3, 700, 8, 8, device, seed=1)
    args = (c["query"], c["packed"], c["table"], c["lens"], c["ranges"], 8, THETA, c["layout"], 0.125)
    ref = kvquant_ref.decode_attention(*args)
    out = kvquant_triton.kvquant_decode(*args, max_position=c["max_position"])
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def measure(shape: str, batch: int, context: int, key_bits: int, value_bits: int, device) -> dict:
    from triton.testing import do_bench

    from vllm_kvcompress.kernels import dense_triton, kvquant_triton

    num_q_heads, num_kv_heads, head_dim = SHAPES[shape]
    c = case(num_q_heads, num_kv_heads, head_dim, batch, context, key_bits, value_bits, device)
    scale = head_dim ** -0.5
    kvq = do_bench(lambda: kvquant_triton.kvquant_decode(
        c["query"], c["packed"], c["table"], c["lens"], c["ranges"], key_bits, THETA, c["layout"], scale,
        max_kv_len=context, max_position=c["max_position"]))
    dense = do_bench(lambda: dense_triton.dense_decode(c["query"], c["dense"], c["table"], c["lens"], scale,
                                                       max_kv_len=context))
    row_bytes = c["layout"].row_bytes
    return {"shape": shape, "batch": batch, "context": context, "key_bits": key_bits, "value_bits": value_bits,
            "kvquant_us": round(1000 * kvq, 2), "dense_bf16_us": round(1000 * dense, 2),
            "kvquant_over_dense": round(kvq / dense, 3), "bytes_per_row": row_bytes,
            "dense_bytes_per_row": 4 * head_dim}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="two small cells per shape")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (the kernel's CPU check is tests/test_kvquant_triton.py)")
    device = torch.device("cuda")
    error = check(device)
    print(f"Triton vs reference, relative error {error:.2e}", flush=True)
    rows = []
    for shape in SHAPES:
        for batch, context in QUICK_CELLS if args.quick else CELLS:
            for key_bits, value_bits in BITS:
                row = measure(shape, batch, context, key_bits, value_bits, device)
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "host": platform.node(), "relative_error": error}
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# kvquant decode vs dense bf16 decode ({meta['gpu']}, {meta['date']})", "",
             f"`python -m benchmarks.kernels_kvquant --out {args.out}`; Triton vs reference relative error "
             f"{error:.2e}. One layer call, median of `do_bench`; rows carry positions.", "",
             "| shape | B | context | key / value bits | bytes per row (bf16) | kvquant us | dense bf16 us | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['batch']} | {r['context']} | {r['key_bits']} / {r['value_bits']} | "
              f"{r['bytes_per_row']} ({r['dense_bytes_per_row']}) | {r['kvquant_us']} | {r['dense_bf16_us']} | "
              f"{r['kvquant_over_dense']} |" for r in rows]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
