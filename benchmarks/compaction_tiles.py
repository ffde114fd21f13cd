"""Tile sizes of the compaction move on a CUDA GPU, at decode-compaction shapes (Llama-3-8B:
32 layers, 8 KV heads, bf16 [k | v] rows of 256; kept rows chosen at random):

    PYTHONPATH=$PWD python3 -m benchmarks.compaction_tiles OUT.json

Each variant's result is compared with the two-phase plan's (byte for byte), and timed against
a plain copy of the same bytes. Then knorm's key norms per tile shape (against the default's
result, timed against a plain read of the keys' bytes) and the selection of the kept rows.
Chose
``compaction_triton.BLOCK_ROWS``/``NUM_WARPS`` and ``key_norms``' tile (results/2026-12-04/h200-eviction-6/compaction-tiles).
The sweeps run at f848a9c (their JSON) also had 64-128-row tiles with 8 warps (slower still)
and a kernel that skipped loading the rows that stay in place (no faster)."""
import functools
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

from benchmarks.kernels_compaction import STEP_HEADS, STEP_LAYERS, STEP_WIDTH, step_case
from vllm_kvcompress.kernels import compaction_triton as ct

# (two-phase plan, rows per tile, warps); 32 x 4 was the default before this sweep
VARIANTS = [(False, 32, 4), (False, 16, 2), (False, 16, 1), (False, 8, 1), (False, 8, 2), (False, 4, 1),
            (False, 32, 2), (False, 32, 1), (True, 16, 2), (True, 8, 1)]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        raise SystemExit("usage: python3 -m benchmarks.compaction_tiles OUT.json")
    gen = torch.Generator().manual_seed(0)
    out = norm_tiles(gen) + selection(gen)  # first: the move's sweep is the long one
    for batch, held, kept in [(16, 272, 256), (256, 272, 256), (32, 1040, 1024), (4, 2048, 512), (1, 8208, 8192)]:
        caches, table, keep, lens = step_case(batch, held, kept, "cuda", gen)
        ref = [c.clone() for c in caches]
        ct.compact_layers(ref, table, keep, lens, two_phase=True)
        variants = {f"{'two-phase' if two_phase else 'in place'} r{rows} w{warps}":
                    functools.partial(ct.compact_layers, block_r=rows, num_warps=warps, two_phase=two_phase)
                    for two_phase, rows, warps in VARIANTS}
        moved_bytes = STEP_LAYERS * batch * STEP_HEADS * kept * STEP_WIDTH * 2 * 2
        row = {"batch": batch, "held": held, "kept": kept, "bytes_rw": moved_bytes}
        flat = torch.empty(moved_bytes // 4, dtype=torch.bfloat16, device="cuda")
        row["copy_same_bytes_us"] = do_bench(flat.clone) * 1e3
        for name, fn in variants.items():
            work = [c.clone() for c in caches]
            fn(work, table, keep, lens)
            ok = all(torch.equal(a, b) for a, b in zip(work, ref, strict=True))
            row[name] = {"us": do_bench(functools.partial(fn, work, table, keep, lens)) * 1e3, "identical": ok}
        print(json.dumps(row), flush=True)
        out.append(row)
        del caches, ref
        torch.cuda.empty_cache()
    Path(argv[0]).write_text(json.dumps(out, indent=1))
    return 0


# knorm's scores: (rows per tile, warps); 16 x 1 is the default since results/2026-12-04/h200-eviction-8
# (64 x 4 before: 255 us per step for 16 requests x 272 rows in the B=256 profile at fcec862, about
# 1/3 of the bandwidth their bytes need; 16 x 1 reads them at a plain read's speed).
NORM_VARIANTS = [(64, 4), (32, 4), (32, 2), (16, 2), (16, 1), (8, 1), (128, 4), (128, 8)]


def norm_tiles(gen: torch.Generator) -> list[dict]:
    rows = []
    for batch, held in [(16, 272), (256, 272), (4, 2048)]:
        caches, table, _, _ = step_case(batch, held, held, "cuda", gen)
        ref = ct.key_norms(caches, table, held, block_t=64, num_warps=4)  # the tile before
        key_bytes = STEP_LAYERS * batch * STEP_HEADS * held * (STEP_WIDTH // 2) * 2
        row = {"norms": True, "batch": batch, "held": held, "key_bytes": key_bytes,
               "read_same_bytes_us": do_bench(torch.empty(key_bytes // 2, dtype=torch.bfloat16, device="cuda").sum)
               * 1e3}
        for block_t, warps in NORM_VARIANTS:
            fn = functools.partial(ct.key_norms, caches, table, held, block_t=block_t, num_warps=warps)
            row[f"t{block_t} w{warps}"] = {"us": do_bench(fn) * 1e3,
                                            "matches": bool(torch.allclose(fn(), ref, rtol=1e-5, atol=1e-5))}
        print(json.dumps(row), flush=True)
        rows.append(row)
        del caches
        torch.cuda.empty_cache()
    return rows


def selection(gen: torch.Generator) -> list[dict]:
    """The kept rows of a step's compactions from the scores (every layer, ``keep_indices_batch``),
    and its last part on its own: the chosen rows put in ascending order by ``ascending`` (mark and
    count) against the segmented sort it replaced (whether both agree is recorded: `identical`)."""
    from vllm_kvcompress.eviction.selection import BatchTargets, ascending, keep_indices_batch

    rows = []
    for batch, held, kept in [(16, 272, 256), (256, 272, 256), (4, 2048, 512)]:
        scores = torch.rand(STEP_LAYERS, batch, STEP_HEADS, held, generator=gen).cuda()
        targets = BatchTargets.of([held] * batch, [kept] * batch, "cuda")
        chosen = torch.sort(scores, dim=-1, descending=True).indices[..., :kept]

        def by_sort(chosen=chosen):
            return torch.sort(chosen, dim=-1).values

        by_count = functools.partial(ascending, chosen, held)
        row = {"selection": True, "batch": batch, "held": held, "kept": kept,
               "keep_indices_batch_us": do_bench(functools.partial(keep_indices_batch, scores, targets, 4, 16)) * 1e3,
               "order_by_sort_us": do_bench(by_sort) * 1e3, "order_by_count_us": do_bench(by_count) * 1e3,
               "identical": bool(torch.equal(by_sort(), by_count()))}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
