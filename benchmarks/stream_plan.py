"""Host cost of the per-(layer, KV head) stream methods' step plan, per decode step: what the
scheduler asks of each request's schedule (vLLM's block manager calls ``rows_during`` /
``rows_held`` about five times per request and step) and the metadata builder's plan
(``stream_layout.build``) for a batch of decoding requests. On the GPU this Python runs before
every step; where it takes longer than the GPU's step the host is the limit
(``benchmarks.gpu_host_profile`` shows it inside the engine).

Nothing runs a forward here: every request starts packed (HeadKV-style budgets averaging 1/4
of its prompt, or a DMS-style ring with survivors), and each step appends one token. Rings:
after each step every stream keeps its leaving token with probability 1/4 (DMS at 4x), so a
request's streams take a few new pages per step, as they do when serving.

    python3 -m benchmarks.stream_plan --batch 64 320 --out DIR   (any machine; CPU tensors)
    python3 -m benchmarks.stream_plan --device cuda ...           (the plan for a CUDA pool: pinned
                                                                   tables, copies to the GPU; host time;
                                                                   budgets: also the copy into the CUDA
                                                                   graph buffers)
    python3 -m benchmarks.stream_plan --device meta ...           (no GPU: the device plan's host side on
                                                                   shape-only tensors; torch's meta kernels
                                                                   are Python, so it overstates what the
                                                                   launches cost on CUDA)

Shape: Llama-3-8B's streams (32 layers x 8 KV heads), blocks of 16, pages of 16.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from vllm_kvcompress.eviction.streams import PoolGeometry, StreamSchedule, cdiv
from vllm_kvcompress.eviction.threshold import ThresholdSchedule
from vllm_kvcompress.vllm import stream_layout
from vllm_kvcompress.vllm.state import PoolState, RequestCache, WorkerState

LAYERS, HEADS, BLOCK, PAGE, WINDOW = 32, 8, 16, 16, 256
SURVIVING = 0.25  # rings: the share of leaving tokens a stream keeps (DMS at 4x compression)
SCHEDULER_CALLS = 5  # rows_during/rows_held per request and step in vLLM's block manager (measured in a profile)


class _Metadata:
    def __init__(self, batch: int, table: torch.Tensor):
        self.query_start_loc_cpu = torch.arange(batch + 1, dtype=torch.int32)
        self.block_table_tensor = table
        self.num_actual_tokens = batch


def _requests(method: str, batch: int, context: int, generator: torch.Generator):
    streams = LAYERS * HEADS
    blocks_each = cdiv(context + 4096, BLOCK)  # room to grow
    geometry = PoolGeometry(LAYERS, batch * blocks_each, HEADS, BLOCK, PAGE)
    table = torch.arange(batch * blocks_each, dtype=torch.int32).view(batch, blocks_each)
    caches = []
    for r in range(batch):
        if method == "headkv":
            weights = torch.rand(streams, generator=generator) ** 3 + 0.05
            budgets = tuple(int(b) for b in (weights / weights.sum() * streams * context / 4).clamp(8, context))
            schedule = StreamSchedule(compress_at=context, budgets=budgets, page=PAGE, block_size=BLOCK)
            lengths = schedule.stream_lengths(context)
        else:
            schedule = ThresholdSchedule(compress_at=context, ring=WINDOW, streams=streams, page=PAGE,
                                         block_size=BLOCK, threshold=0.0, delayed=True)
            kept = torch.randint(0, (context - WINDOW) // 2, (LAYERS, HEADS), generator=generator)
            lengths = (kept.flatten() + WINDOW + 1).tolist()
        cache = RequestCache(schedule, length=context)
        blocks = table[r].tolist()
        cache.stream_table = stream_layout.packed_table(geometry, lengths, blocks, schedule)
        if method != "headkv":
            cache.kept = kept
            schedule.pages_next = schedule.pages_for(kept.flatten().tolist())
        caches.append(cache)
    return geometry, table, caches


def measure(method: str, batch: int, context: int, steps: int, device: str = "cpu") -> dict:
    generator = torch.Generator().manual_seed(0)
    geometry, table, caches = _requests(method, batch, context, generator)
    metadata = _Metadata(batch, table.to(device))
    state = WorkerState()
    state.pool = PoolState(num_blocks=geometry.num_blocks)
    req_ids = [f"r{i}" for i in range(batch)]
    state.requests = dict(zip(req_ids, caches))
    # Budget layouts replay CUDA graphs from persistent buffers: the plan is copied there too.
    buffers = stream_layout.StreamDecodeBuffers(LAYERS, HEADS, batch, context + steps, PAGE, torch.device(device)) \
        if method == "headkv" else None
    scheduler_ms, build_ms, fill_ms = [], [], []
    for i in range(steps):
        computed = context + i
        started = time.perf_counter()
        for cache in caches:
            for _ in range(SCHEDULER_CALLS):
                cache.schedule.rows_during(computed, computed + 1)
        scheduler_ms.append(1000 * (time.perf_counter() - started))
        step = state.begin_step(req_ids)
        step.host_block_table = table
        seq_lens = torch.full((batch,), computed + 1, dtype=torch.int32)
        started = time.perf_counter()
        meta = stream_layout.build(metadata, batch, geometry, step, state.pool, seq_lens)
        build_ms.append(1000 * (time.perf_counter() - started))
        assert meta is not None and meta.decode_token_index.numel() == batch
        if buffers is not None:
            started = time.perf_counter()
            buffers.fill(meta, batch, geometry, step, state.pool, meta.max_decode_len)
            fill_ms.append(1000 * (time.perf_counter() - started))
        state.end_step()
        if method == "ring":  # the forward's decisions, settled after the step (untimed)
            for cache in caches:
                cache.kept = cache.kept + (torch.rand(cache.kept.shape, generator=generator) < SURVIVING).long()
                cache.schedule.pages_next = cache.schedule.pages_for(cache.kept)
    return {"method": method, "batch": batch, "context": context, "steps": steps, "device": device,
            "scheduler_ms_per_step": round(statistics.median(scheduler_ms), 3),
            "build_ms_per_step": round(statistics.median(build_ms), 3),
            "graph_buffers_fill_ms_per_step": round(statistics.median(fill_ms), 3) if fill_ms else None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 320])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--methods", nargs="+", choices=["headkv", "ring"], default=["headkv", "ring"])
    parser.add_argument("--device", default="cpu", help="the pool's device (cpu, cuda, meta)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.context <= WINDOW:
        parser.error(f"--context must exceed the ring window {WINDOW} (got {args.context})")
    torch.set_num_threads(1)  # the engine's planning runs on one host thread
    rows = []
    for method in args.methods:
        for batch in args.batch:
            row = measure(method, batch, args.context, args.steps, args.device)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "stream_plan.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
