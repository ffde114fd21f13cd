"""Compaction kernel on a CUDA GPU: correctness on realistic shapes, then timings.

    python -m benchmarks.kernels_compaction --out DIR [--quick]

One compaction = one layer of a batch of requests keeping ``keep`` of ``ctx`` rows per
KV head, moved in place to the front of each request's shuffled block list.
1. Correctness: ``compaction_triton.compact_batch`` against ``compaction_ref.compact_batch``
   (CPU), byte for byte, for dense bf16 rows (head_dim 64 / 128) and LOOKAT rows (44 B).
2. Timings (``triton.testing.do_bench``, median): the Triton kernel vs the same move in
   PyTorch on the GPU (one batched gather + scatter over every request, no Python loop),
   each on a fresh copy of the cache. Bytes moved = kept rows x row bytes x 2 (read +
   write); achieved GB/s against the GPU's peak; ratio torch / Triton.
3. A step's compaction in every layer (Llama-3-8B shape: 32 layers, 8 KV heads, head_dim 128,
   bf16): the knorm scores (``key_norms``) and the move (``compact_layers``) of all layers in one
   launch each, against the same per layer (32 launches each; scores from gathered keys, as
   before the one-pass kernels), correctness included (identical moves, norms within 1e-5).
Writes ``results.json`` and ``results.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
from pathlib import Path

import torch
from triton.testing import do_bench

from benchmarks.kernels_lookat import peak_bandwidth
from vllm_kvcompress.kernels import compaction_ref, compaction_triton

ROWS = {  # (KV heads, row elements, dtype): what one cached token of one head occupies
    "qwen2.5-0.5b bf16": (2, 128, torch.bfloat16),
    "qwen2.5-1.5b bf16": (2, 256, torch.bfloat16),
    "qwen2.5-0.5b lookat m8 int4": (2, 44, torch.uint8),
}
BLOCK_SIZE = 16


def make_case(name: str, batch: int, ctx: int, keep_ratio: float, device: str, gen: torch.Generator):
    heads, width, dtype = ROWS[name]
    blocks_per_req = -(-ctx // BLOCK_SIZE)
    num_blocks = batch * blocks_per_req + 1
    cache = torch.randint(0, 120, (num_blocks, heads, BLOCK_SIZE, width), generator=gen, dtype=torch.int32).to(dtype)
    table = (torch.randperm(num_blocks - 1, generator=gen)[: batch * blocks_per_req] + 1).view(batch, -1).int()
    kept = max(1, int(ctx * keep_ratio))
    scores = torch.rand(batch, heads, ctx, generator=gen)
    keep = torch.sort(torch.topk(scores, kept, dim=-1).indices, dim=-1).values.int()
    lens = torch.full((batch,), kept, dtype=torch.int32)
    return cache.to(device), table.to(device), keep.to(device), lens.to(device)


def torch_compact(cache, table, keep, lens):
    """Batched PyTorch move: gather every kept row, then scatter (equal kept counts)."""
    batch, heads, kept = keep.shape
    bs = cache.shape[2]
    req = torch.arange(batch, device=cache.device).view(batch, 1, 1)
    head = torch.arange(heads, device=cache.device).view(1, heads, 1)
    src = cache[table.long()[req, keep.long() // bs], head, keep.long() % bs]
    dst = torch.arange(kept, device=cache.device).view(1, 1, kept)
    cache[table.long()[req, dst // bs], head, dst % bs] = src


def correctness(device: str, gen: torch.Generator) -> list[dict]:
    checks = []
    for name in ROWS:
        for batch, ctx, ratio in ((3, 1000, 0.3), (8, 4096, 0.5), (2, 8192, 0.05), (64, 4096, 0.5)):
            for two_phase in (False, True):
                cache, table, keep, lens = make_case(name, batch, ctx, ratio, device, gen)
                ref = cache.cpu().clone()
                compaction_ref.compact_batch(ref, table.cpu().long(), keep.cpu().long(), lens.cpu())
                compaction_triton.compact_batch(cache, table, keep, lens, two_phase=two_phase)
                same = bool(torch.equal(cache.cpu(), ref))
                checks.append({"rows": name, "batch": batch, "ctx": ctx, "keep": ratio,
                               "plan": "two-phase" if two_phase else "in place", "identical": same})
    return checks


def timings(device: str, gen: torch.Generator, quick: bool) -> list[dict]:
    rows = []
    batches = (1, 16) if quick else (1, 4, 16, 64)
    contexts = (4096,) if quick else (4096, 16384, 32768)
    for name, (heads, width, dtype) in ROWS.items():
        row_bytes = width * torch.tensor([], dtype=dtype).element_size()
        for batch in batches:
            for ctx in contexts:
                for ratio in (0.5, 0.1):
                    cache, table, keep, lens = make_case(name, batch, ctx, ratio, device, gen)
                    work = cache.clone()

                    def fresh(fn):
                        def run():
                            work.copy_(cache)
                            fn(work, table, keep, lens)
                        return run

                    copy_ms = do_bench(lambda: work.copy_(cache))
                    plans = {plan: do_bench(fresh(functools.partial(compaction_triton.compact_batch,
                                                                    two_phase=plan == "two-phase"))) - copy_ms
                             for plan in ("in place", "two-phase")}
                    t_ms = do_bench(fresh(compaction_triton.compact_batch)) - copy_ms
                    p_ms = do_bench(fresh(torch_compact)) - copy_ms
                    moved = 2 * batch * heads * keep.shape[-1] * row_bytes
                    rows.append({"rows": name, "batch": batch, "ctx": ctx, "keep": ratio, "triton_us": t_ms * 1e3,
                                 "in_place_us": plans["in place"] * 1e3, "two_phase_us": plans["two-phase"] * 1e3,
                                 "torch_us": p_ms * 1e3, "torch_over_triton": p_ms / t_ms,
                                 "triton_gbs": moved / (t_ms * 1e-3) / 1e9, "bytes": moved})
    return rows


STEP_LAYERS, STEP_HEADS, STEP_WIDTH = 32, 8, 256


def step_case(batch: int, held: int, kept: int, device: str, gen: torch.Generator):
    """Every layer's cache (allocated apart, as vLLM does) for ``batch`` requests holding ``held`` rows."""
    blocks_per_req = -(-held // BLOCK_SIZE)
    num_blocks = batch * blocks_per_req + 1
    caches = [torch.randn(num_blocks, STEP_HEADS, BLOCK_SIZE, STEP_WIDTH, generator=gen).bfloat16().to(device)
              for _ in range(STEP_LAYERS)]
    table = (torch.randperm(num_blocks - 1, generator=gen)[: batch * blocks_per_req] + 1).view(batch, -1).int()
    scores = torch.rand(STEP_LAYERS, batch, STEP_HEADS, held, generator=gen)
    keep = torch.sort(torch.topk(scores, kept, dim=-1).indices, dim=-1).values
    lens = torch.full((batch,), kept, dtype=torch.int32)
    return caches, table.to(device), keep.to(device), lens.to(device)


def step_layers(device: str, gen: torch.Generator, quick: bool) -> tuple[list[dict], list[dict]]:
    """One step's knorm scores and move in every layer: one launch each vs a launch per layer."""
    from vllm_kvcompress.kernels import paged_dense_ref

    checks, rows = [], []
    cases = ((32, 272, 256), (1, 8208, 8192)) if quick else ((32, 272, 256), (256, 272, 256), (1, 8208, 8192),
                                                             (32, 4096, 1024))
    for batch, held, kept in cases:
        caches, table, keep, lens = step_case(batch, held, kept, device, gen)
        norms = compaction_triton.key_norms(caches, table, held)
        ref_norms = compaction_ref.key_norms([c.cpu() for c in caches], table.cpu().long(), held)
        moved = [c.clone() for c in caches]
        compaction_triton.compact_layers(moved, table, keep, lens)
        expect = [c.cpu() for c in caches]
        compaction_ref.compact_layers(expect, table.cpu().long(), keep.cpu(), lens.cpu())
        checks.append({"rows": f"step of {STEP_LAYERS} layers", "batch": batch, "ctx": held, "keep": kept,
                       "plan": "one launch", "identical": all(torch.equal(m.cpu(), e) for m, e in zip(moved, expect))
                       and bool(torch.allclose(norms.cpu(), ref_norms, rtol=1e-5, atol=1e-5))})

        def per_layer_norms():
            for cache in caches:
                torch.linalg.vector_norm(paged_dense_ref.gather_rows(cache, table, held)[..., :128].float(), dim=-1)

        def per_layer_moves():
            for cache, layer_keep in zip(caches, keep):
                compaction_triton.compact_batch(cache, table, layer_keep, lens)

        rows.append({"batch": batch, "held": held, "kept": kept,
                     "norms_one_us": do_bench(lambda: compaction_triton.key_norms(caches, table, held)) * 1e3,
                     "norms_per_layer_us": do_bench(per_layer_norms) * 1e3,
                     "move_one_us": do_bench(lambda: compaction_triton.compact_layers(caches, table, keep, lens)) * 1e3,
                     "move_per_layer_us": do_bench(per_layer_moves) * 1e3})
    return checks, rows


def write_report(out: Path, meta: dict, checks: list[dict], rows: list[dict], peak: float,
                 step_rows: list[dict] = ()) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "checks": checks, "timings": rows,
                                                  "step": list(step_rows)}, indent=2))
    lines = [f"# Compaction kernel ({meta['date']})", "", f"- command: `{meta['command']}`",
             f"- device: {meta['device']}; torch {meta['torch']}; triton {meta['triton']}; block size {BLOCK_SIZE}",
             "- times: median of `triton.testing.do_bench`, minus a cache copy (each run starts from a fresh copy); "
             "bytes = kept rows x row bytes x 2",
             "", "## Correctness (byte-identical to `compaction_ref`)", "",
             "| rows | batch | ctx | keep | plan | identical |", "|---|---|---|---|---|---|"]
    lines += [f"| {c['rows']} | {c['batch']} | {c['ctx']} | {c['keep']} | {c['plan']} | {c['identical']} |"
              for c in checks]
    lines += ["", "## Timings, one layer", "",
              "Triton = `compact_batch` with its default plan; the in-place and two-phase plans (default tiles, "
              f"{compaction_triton.BLOCK_ROWS} rows) are also timed alone.", "",
              "| rows | batch | ctx | keep | in place (µs) | two-phase (µs) | Triton (µs) | torch (µs) | torch / Triton | "
              "Triton GB/s | % of peak |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['rows']} | {r['batch']} | {r['ctx']} | {r['keep']} | {r['in_place_us']:.1f} | {r['two_phase_us']:.1f} | "
              f"{r['triton_us']:.1f} | {r['torch_us']:.1f} | "
              f"{r['torch_over_triton']:.2f}x | {r['triton_gbs']:.0f} | {100 * r['triton_gbs'] / peak:.0f}% |" for r in rows]
    lines += ["", f"## One step in every layer ({STEP_LAYERS} layers, {STEP_HEADS} KV heads, bf16 [k | v] rows of "
              f"{STEP_WIDTH})", "", "Wall time of the launches (host included, `do_bench`): one launch for all layers "
              "against one per layer. Every repetition moves the same rows again (other contents, the same "
              "work).", "",
              "| batch | rows held | kept | norms, one launch (µs) | norms, per layer (µs) | x | move, one launch (µs) "
              "| move, per layer (µs) | x |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['held']} | {r['kept']} | {r['norms_one_us']:.0f} | {r['norms_per_layer_us']:.0f} | "
              f"{r['norms_per_layer_us'] / r['norms_one_us']:.1f} | {r['move_one_us']:.0f} | "
              f"{r['move_per_layer_us']:.0f} | {r['move_per_layer_us'] / r['move_one_us']:.1f} |" for r in step_rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    import sys

    import triton

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.kernels_compaction needs a CUDA GPU (the CPU tests cover correctness)")
    device = "cuda"
    name = torch.cuda.get_device_name()
    peak, peak_label = peak_bandwidth(name)
    gen = torch.Generator().manual_seed(0)
    checks = correctness(device, gen)
    rows = timings(device, gen, args.quick)
    step_checks, step_rows = step_layers(device, gen, args.quick)
    checks += step_checks
    meta = {"date": datetime.date.today().isoformat(), "command": "python -m benchmarks.kernels_compaction " +
            " ".join(sys.argv[1:] if argv is None else argv), "device": f"{name} (peak {peak_label})",
            "torch": torch.__version__, "triton": triton.__version__, "host": platform.node()}
    write_report(Path(args.out), meta, checks, rows, peak, step_rows)
    print((Path(args.out) / "results.md").read_text())
    return 0 if all(c["identical"] for c in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
