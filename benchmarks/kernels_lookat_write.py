"""The fused LOOKAT cache write (``lookat_write_triton``) against its PyTorch reference
(``lookat_ref.encode_write``: ``encode_rows`` + ``write_rows``) on a CUDA GPU.

    python -m benchmarks.kernels_lookat_write --out DIR [--quick]

Shape: Llama-3-8B attention (8 KV heads, head_dim 128), m=16 subspaces of 256 centroids,
int4, int8 and bf16 values (timed: int4 and bf16), 16-token blocks, tokens written to shuffled slots. Per token count
(1 and 32 are decode steps, 256 a large decode batch, 8192 a prefill chunk):
- correctness: bytes equal to the reference's rows, and codes that differ only at a
  tie of distances (fp32 sums in another order);
- the kernel's default (tensor-core distances) timed beside each variant (fp32
  distances, 16 tokens per program; tensor cores with 16 and 64);
- time per call, each replayed from a CUDA graph as vLLM replays decode
  (``kernels_lookat.bench_ms``: ``do_bench`` median, L2 flushed), reference / kernel
  ratio, and the two x 32 layers (a Llama-3-8B step).
Writes ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

from benchmarks.kernels_lookat import bench_ms
from vllm_kvcompress.kernels import lookat_ref

HKV, D, M, K, BS, LAYERS = 8, 128, 16, 256, 16, 32
TOKENS = (1, 32, 256, 8192)


def case(tokens: int, bits: int, gen: torch.Generator, device: str):
    layout = lookat_ref.LookatLayout(head_dim=D, m=M, value_bits=bits)
    codebooks = (torch.randn(HKV, M, K, D // M, generator=gen) * 0.5).to(torch.bfloat16).float()
    keys = torch.randn(tokens, HKV, D, generator=gen).to(torch.bfloat16)
    values = torch.randn(tokens, HKV, D, generator=gen).to(torch.bfloat16)
    num_blocks = tokens // BS + 8
    slots = torch.randperm(num_blocks * BS, generator=gen)[:tokens]
    cache = torch.zeros(num_blocks, HKV, BS, layout.row_bytes, dtype=torch.uint8)
    return layout, *(x.to(device) for x in (codebooks, keys, values, slots, cache))


def check(tokens: int, bits: int, gen: torch.Generator) -> dict:
    from vllm_kvcompress.kernels import lookat_write_triton

    layout, codebooks, keys, values, slots, cache = case(tokens, bits, gen, "cuda")
    ref, out = cache.clone(), cache.clone()
    lookat_ref.encode_write(ref, keys, values, slots, codebooks, None, layout)
    lookat_write_triton.lookat_write(out, keys, values, slots, codebooks, None, layout)
    rows = lambda c: c.transpose(1, 2).flatten(0, 1)[slots.long()]  # noqa: E731  [T, Hkv, row]
    r, o = rows(ref), rows(out)
    codes_r, codes_o = r[..., :M].long(), o[..., :M].long()
    sub = keys.float().unflatten(-1, (M, -1))
    dist = ((sub.unsqueeze(3) - codebooks.unsqueeze(0)) ** 2).sum(-1)  # [T, Hkv, m, K]
    gap = (dist.gather(-1, codes_o.unsqueeze(-1)) - dist.gather(-1, codes_r.unsqueeze(-1))).abs().max()
    return {"tokens": tokens, "value_bits": bits, "codes_equal": float((codes_r == codes_o).float().mean()),
            "values_equal": bool(torch.equal(r[..., M:], o[..., M:])), "max_code_distance_gap": float(gap)}


def time_one(tokens: int, bits: int, gen: torch.Generator, quick: bool) -> dict:
    from vllm_kvcompress.kernels import lookat_write_triton

    layout, codebooks, keys, values, slots, cache = case(tokens, bits, gen, "cuda")
    ref_ms = bench_ms(lambda: lookat_ref.encode_write(cache, keys, values, slots, codebooks, None, layout), quick)
    kernel_ms = bench_ms(lambda: lookat_write_triton.lookat_write(cache, keys, values, slots, codebooks, None,
                                                                  layout), quick)
    # The default (tensor-core distances, 16 or 64 tokens per program by count) beside each variant.
    variants = {f"{d}_bt{bt}_us": round(1000 * bench_ms(lambda d=d, bt=bt: lookat_write_triton.lookat_write(
        cache, keys, values, slots, codebooks, None, layout, distances=d, block_t=bt), quick), 1)
        for d, bt in (("fma", 16), ("mma", 16), ("mma", 64))}
    return {"tokens": tokens, "value_bits": bits, "reference_us": round(1000 * ref_ms, 1),
            "kernel_us": round(1000 * kernel_ms, 1), "speedup": round(ref_ms / kernel_ms, 2), **variants,
            "reference_ms_per_step_32_layers": round(LAYERS * ref_ms, 3),
            "kernel_ms_per_step_32_layers": round(LAYERS * kernel_ms, 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    checks = [check(t, b, gen) for t in TOKENS for b in (4, 8, 16)]
    rows = [time_one(t, b, gen, args.quick) for t in TOKENS for b in (4, 16)]
    meta = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "command": "python -m benchmarks.kernels_lookat_write " + " ".join(sys.argv[1:] if argv is None else argv)}
    (args.out / "results.json").write_text(json.dumps({**meta, "checks": checks, "timings": rows}, indent=1))
    lines = [f"# LOOKAT cache write: fused Triton kernel vs PyTorch ops ({meta['gpu']}, {meta['date']})", "",
             f"`{meta['command']}`; 8 KV heads, head_dim 128, m=16 x 256 centroids; CUDA-graph replays.", "",
             "| tokens | value bits | reference us | kernel us | reference / kernel | x 32 layers: ref ms | kernel ms "
             "| fma, 16 tokens us | mma, 16 tokens us | mma, 64 tokens us |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['tokens']} | {r['value_bits']} | {r['reference_us']} | {r['kernel_us']} | {r['speedup']}x | "
              f"{r['reference_ms_per_step_32_layers']} | {r['kernel_ms_per_step_32_layers']} | {r['fma_bt16_us']} | "
              f"{r['mma_bt16_us']} | {r['mma_bt64_us']} |" for r in rows]
    lines += ["", "| tokens | value bits | codes equal | values equal | largest distance gap where codes differ |",
              "|---|---|---|---|---|"]
    lines += [f"| {c['tokens']} | {c['value_bits']} | {c['codes_equal']:.5f} | {c['values_equal']} | "
              f"{c['max_code_distance_gap']:.2e} |" for c in checks]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    ok = all(c["values_equal"] and c["max_code_distance_gap"] < 1e-3 for c in checks)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
