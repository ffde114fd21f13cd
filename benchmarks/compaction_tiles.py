"""Tile sizes of the compaction move on a CUDA GPU, at decode-compaction shapes (Llama-3-8B:
32 layers, 8 KV heads, bf16 [k | v] rows of 256; kept rows chosen at random):

    PYTHONPATH=$PWD python3 -m benchmarks.compaction_tiles OUT.json

Each variant's result is compared with the two-phase plan's (byte for byte), and timed against
a plain copy of the same bytes. Chose
``compaction_triton.BLOCK_ROWS``/``NUM_WARPS`` (results/2026-12-04/h200-eviction-6/compaction-tiles).
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
    out = []
    gen = torch.Generator().manual_seed(0)
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


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
