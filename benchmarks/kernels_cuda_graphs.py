"""The decode kernels inside CUDA graphs: captured once, replayed with new metadata.

    python -m benchmarks.kernels_cuda_graphs --out DIR      # needs a CUDA GPU

vLLM captures decode once per batch-size bucket and replays it every step, changing only
the *contents* of static buffers (queries, block tables, lengths). A kernel is
capture-safe when its launch depends on nothing but shapes and host-side bounds: each
Triton wrapper takes ``max_kv_len`` (the bucket's bound, a host int) and plans its grid
from it, so no device value is read back while capturing. Compaction and HeadKV
re-budgeting run *between* replays, outside the graph, and only rewrite the buffers.

For the dense paged decode (methods ``none`` and the budget evictions), the HeadKV
stream decode and the LOOKAT decode, this script:
1. captures one decode call over static buffers sized for ``batch`` requests of up to
   ``capacity`` tokens;
2. replays it for several rounds, each with new queries, lengths and block tables (the
   dense round 3 first compacts the cache with the Triton compaction kernel, eagerly, and
   shrinks the lengths to the kept rows), and compares every replay with the PyTorch
   reference on the same buffers;
3. times the eager wrapper call against the graph replay (median, ``do_bench``).
Writes ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
from triton.testing import do_bench

from vllm_kvcompress.kernels import (compaction_triton, dense_triton, lookat_ref, lookat_triton, paged_dense_ref,
                                     stream_attention_ref, stream_attention_triton)

BLOCK = 16
PAGE = 16


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float().cpu(), ref.float().cpu()
    return float((out - ref).norm() / ref.norm()) if torch.isfinite(out).all() else float("inf")


def capture(fn):
    """``(graph, output)`` of ``fn`` captured after a warm-up on a side stream (compiles Triton)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _timings(fn, graph) -> dict:
    eager = float(do_bench(fn, warmup=10, rep=50, return_mode="median"))
    replay = float(do_bench(graph.replay, warmup=10, rep=50, return_mode="median"))
    return {"eager_us": eager * 1e3, "graph_us": replay * 1e3, "eager_over_graph": eager / replay}


def dense_case(batch: int, capacity: int, hq: int, hkv: int, d: int, rounds: int, gen: torch.Generator) -> dict:
    scale, blocks = d ** -0.5, capacity // BLOCK
    num_blocks = batch * blocks + 1
    cache = torch.randn(num_blocks, hkv, BLOCK, 2 * d, generator=gen).bfloat16().cuda()
    query = torch.empty(batch, hq, d, dtype=torch.bfloat16, device="cuda")
    table = torch.zeros(batch, blocks, dtype=torch.int32, device="cuda")
    lens = torch.ones(batch, dtype=torch.int32, device="cuda")

    def call():
        return dense_triton.dense_decode(query, cache, table, lens, scale, max_kv_len=capacity)

    errors = []
    graph = None
    for round_ in range(rounds):
        query.copy_((torch.randn(batch, hq, d, generator=gen) * 3).bfloat16())
        table.copy_((torch.randperm(num_blocks - 1, generator=gen)[: batch * blocks] + 1).view(batch, blocks))
        lens.copy_(torch.randint(1, capacity + 1, (batch,), generator=gen))
        if round_ == rounds - 1:  # eviction between steps: compact in place, then shorter lengths
            kept = int(lens.min().item())
            keep = torch.stack([torch.stack([torch.sort(torch.randperm(int(n), generator=gen)[:kept]).values
                                             for _ in range(hkv)]) for n in lens.cpu()]).int().cuda()
            keep_lens = torch.full((batch,), kept, dtype=torch.int32, device="cuda")
            before = cache.clone()
            compaction_triton.compact_batch(cache, table, keep, keep_lens)
            lens.copy_(keep_lens)
            # the reference reads the pre-compaction rows through the kept indices
            moved = paged_dense_ref.decode_attention(query.cpu(), _kept_view(before, table, keep, kept).cpu(),
                                                     torch.arange(batch * (-(-kept // BLOCK))).view(batch, -1),
                                                     lens.cpu(), scale)
        if graph is None:
            graph, out = capture(call)
        graph.replay()
        torch.cuda.synchronize()
        ref = paged_dense_ref.decode_attention(query.cpu(), cache.cpu(), table.cpu().long(), lens.cpu(), scale)
        errors.append(rel_err(out, ref))
        if round_ == rounds - 1:
            errors.append(rel_err(out, moved))  # compaction moved the right rows
    return {"kernel": "dense paged decode", "batch": batch, "capacity": capacity, "rounds": rounds,
            "max_rel_err": max(errors), "errors": errors, **_timings(call, graph)}


def _kept_view(cache: torch.Tensor, table: torch.Tensor, keep: torch.Tensor, kept: int) -> torch.Tensor:
    """A fresh paged cache (request ``b`` in blocks ``b * blocks ..``) holding, per request
    and head, the rows ``keep`` picks out of ``cache``: what compaction must produce."""
    batch, hkv = keep.shape[:2]
    blocks = -(-kept // BLOCK)
    out = torch.zeros(batch, blocks, hkv, BLOCK, cache.shape[-1], dtype=cache.dtype, device=cache.device)
    slots = torch.arange(kept, device=cache.device)
    for b in range(batch):
        for h in range(hkv):
            rows = keep[b, h, :kept].long()
            out[b, slots // BLOCK, h, slots % BLOCK] = cache[table[b].long()[rows // BLOCK], h, rows % BLOCK]
    return out.reshape(batch * blocks, hkv, BLOCK, cache.shape[-1])


def stream_case(batch: int, capacity: int, hq: int, hkv: int, d: int, rounds: int, gen: torch.Generator) -> dict:
    scale, pages_per_stream = d ** -0.5, capacity // PAGE
    num_pages = batch * hkv * pages_per_stream
    pool = torch.randn(num_pages * PAGE, 2 * d, generator=gen).bfloat16().cuda()
    query = torch.empty(batch, hq, d, dtype=torch.bfloat16, device="cuda")
    pages = torch.zeros(batch, hkv, pages_per_stream, dtype=torch.int32, device="cuda")
    lengths = torch.ones(batch, hkv, dtype=torch.int32, device="cuda")

    def call():
        return stream_attention_triton.stream_decode(query, pool, pages, lengths, PAGE, scale, max_kv_len=capacity)

    errors, graph = [], None
    for _ in range(rounds):  # HeadKV: every head its own length, new page lists each round
        query.copy_((torch.randn(batch, hq, d, generator=gen) * 3).bfloat16())
        pages.copy_(torch.randperm(num_pages, generator=gen).view(batch, hkv, pages_per_stream))
        lengths.copy_(torch.randint(1, capacity + 1, (batch, hkv), generator=gen))
        if graph is None:
            graph, out = capture(call)
        graph.replay()
        torch.cuda.synchronize()
        ref = stream_attention_ref.decode_attention(query.cpu(), pool.cpu(), pages.cpu().long(), lengths.cpu(),
                                                    PAGE, scale)
        errors.append(rel_err(out, ref))
    return {"kernel": "HeadKV stream decode", "batch": batch, "capacity": capacity, "rounds": rounds,
            "max_rel_err": max(errors), "errors": errors, **_timings(call, graph)}


def lookat_case(batch: int, capacity: int, hq: int, hkv: int, d: int, rounds: int, gen: torch.Generator,
                m: int = 16, bits: int = 4) -> dict:
    from benchmarks.kernels_lookat import codebooks_for, lookat_cache

    scale, blocks = d ** -0.5, capacity // BLOCK
    num_blocks = batch * blocks + 1
    layout = lookat_ref.LookatLayout(head_dim=d, m=m, value_bits=bits)
    cache = lookat_cache(num_blocks, hkv, layout, gen, "cuda")
    codebooks = codebooks_for(hkv, m, d, "cuda", gen)
    query = torch.empty(batch, hq, d, dtype=torch.bfloat16, device="cuda")
    table = torch.zeros(batch, blocks, dtype=torch.int32, device="cuda")
    lens = torch.ones(batch, dtype=torch.int32, device="cuda")

    def call():
        return lookat_triton.lookat_decode(query, cache, table, lens, codebooks, layout, scale, max_kv_len=capacity)

    errors, graph = [], None
    for _ in range(rounds):
        query.copy_((torch.randn(batch, hq, d, generator=gen) * 3).bfloat16())
        table.copy_((torch.randperm(num_blocks - 1, generator=gen)[: batch * blocks] + 1).view(batch, blocks))
        lens.copy_(torch.randint(1, capacity + 1, (batch,), generator=gen))
        if graph is None:
            graph, out = capture(call)
        graph.replay()
        torch.cuda.synchronize()
        ref = lookat_ref.decode_attention(query.cpu(), cache.cpu(), table.cpu().long(), lens.cpu(), codebooks.cpu(),
                                          None, layout, scale)
        errors.append(rel_err(out, ref))
    return {"kernel": f"LOOKAT decode (m={m}, {bits}-bit values)", "batch": batch, "capacity": capacity,
            "rounds": rounds, "max_rel_err": max(errors), "errors": errors, **_timings(call, graph)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (the CPU engine path runs PyTorch, not Triton, and has no CUDA graphs)")
    gen = torch.Generator().manual_seed(0)
    shape = dict(hq=12, hkv=2, d=128)  # Qwen2.5-1.5B
    rows = []
    for batch, capacity in ((8, 2048), (32, 4096)):
        rows.append(dense_case(batch, capacity, rounds=args.rounds, gen=gen, **shape))
        rows.append(stream_case(batch, capacity, rounds=args.rounds, gen=gen, **shape))
        rows.append(lookat_case(batch, capacity, rounds=args.rounds, gen=gen, **shape))
    device = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"device": device, "date": date, "rows": rows}, indent=2))
    lines = [f"# Decode kernels under CUDA graphs ({date}, {device})", "",
             "Captured once per (batch, capacity) bucket with `max_kv_len = capacity`; each replay gets new queries, "
             "lengths and block tables (dense: the last round compacts the cache first, eagerly, with the Triton "
             "compaction kernel). Error: largest relative error of any replay vs the PyTorch reference on the same "
             "buffers. Shape: Qwen2.5-1.5B (12 query / 2 KV heads, head_dim 128), bf16.", "",
             "| kernel | batch | capacity | replays | max rel. err | eager us | graph us | eager / graph |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['batch']} | {r['capacity']} | {r['rounds']} | {r['max_rel_err']:.1e} | "
                     f"{r['eager_us']:.1f} | {r['graph_us']:.1f} | {r['eager_over_graph']:.2f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if max(r["max_rel_err"] for r in rows) > 2e-2:
        raise SystemExit("a replay disagrees with the reference")


if __name__ == "__main__":
    main()
