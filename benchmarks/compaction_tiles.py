"""Tile sizes of the compaction move on a CUDA GPU, at decode-compaction shapes (Llama-3-8B:
32 layers, 8 KV heads, bf16 [k | v] rows of 256; kept rows chosen at random):

    PYTHONPATH=$PWD python3 -m benchmarks.compaction_tiles OUT.json

Each variant's result is compared with the two-phase plan's (byte for byte), and timed against
a plain copy of the same bytes. "masked" skips the loads of rows that stay in place. Chose
``compaction_triton.BLOCK_ROWS``/``NUM_WARPS`` (results/2026-12-04/h200-eviction-6/compaction-tiles).
The list of variants is the second sweep's; the first also had 32-128-row tiles with 4-8 warps."""
import functools
import json
import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench
from vllm_kvcompress.kernels import compaction_triton as ct

L, H, W, BS = 32, 8, 256, 16

@triton.jit(do_not_specialize=ct.STEP_SIZES)
def _masked_kernel(cache_ptr, layer_offs_ptr, bt_ptr, keep_ptr, lens_ptr, stride_bt, stride_kl, stride_kr, stride_kh,
                    num_reqs, num_kv_heads, W: tl.constexpr, WP: tl.constexpr, BS: tl.constexpr,
                    BLOCK_R: tl.constexpr):
    layer = tl.program_id(0) // num_reqs
    r = tl.program_id(0) % num_reqs
    h = tl.program_id(1)
    cache = cache_ptr + tl.load(layer_offs_ptr + layer)
    keep = keep_ptr + layer.to(tl.int64) * stride_kl + r * stride_kr + h * stride_kh
    n = tl.load(lens_ptr + r)
    cols = tl.arange(0, WP)
    offs = tl.arange(0, BLOCK_R)
    for j0 in range(0, n, BLOCK_R):
        j = j0 + offs
        src = tl.load(keep + j, mask=j < n, other=0)
        valid = (j < n) & (src != j)
        src_page = tl.load(bt_ptr + r * stride_bt + src // BS, mask=valid, other=0).to(tl.int64)
        dst_page = tl.load(bt_ptr + r * stride_bt + j // BS, mask=valid, other=0).to(tl.int64)
        src_row = ((src_page * num_kv_heads + h) * BS + src % BS) * W
        dst_row = ((dst_page * num_kv_heads + h) * BS + j % BS) * W
        m = valid[:, None] & (cols < W)[None, :]
        rows = tl.load(cache + src_row[:, None] + cols[None, :], mask=m)
        tl.debug_barrier()
        tl.store(cache + dst_row[:, None] + cols[None, :], rows, mask=m)


def masked(caches, table, keep, lens, block_r=32, num_warps=4):
    num_layers, num_reqs, heads = keep.shape[:3]
    cache = caches[0]
    strides = (table.stride(0), keep.stride(0), keep.stride(1), keep.stride(2), num_reqs, heads)
    _masked_kernel[(num_layers * num_reqs, heads)](cache, ct.layer_offsets(caches), table, keep, lens, *strides,
                                                   W=W, WP=W, BS=BS, BLOCK_R=block_r, num_warps=num_warps)


def case(batch, held, kept, gen):
    bpr = -(-held // BS)
    nb = batch * bpr + 1
    caches = [torch.randn(nb, H, BS, W, generator=gen).bfloat16().cuda() for _ in range(L)]
    table = (torch.randperm(nb - 1, generator=gen)[: batch * bpr] + 1).view(batch, -1).int().cuda()
    scores = torch.rand(L, batch, H, held, generator=gen)
    keep = torch.sort(torch.topk(scores, kept, dim=-1).indices, dim=-1).values.cuda()
    lens = torch.full((batch,), kept, dtype=torch.int32).cuda()
    return caches, table, keep, lens

out = []
gen = torch.Generator().manual_seed(0)
for batch, held, kept in [(16, 272, 256), (256, 272, 256), (32, 1040, 1024), (4, 2048, 512), (1, 8208, 8192)]:
    caches, table, keep, lens = case(batch, held, kept, gen)
    ref = [c.clone() for c in caches]
    ct.compact_layers(ref, table, keep, lens, two_phase=True)
    variants = {
        "inplace r16 w2": lambda c: ct.compact_layers(c, table, keep, lens, block_r=16, num_warps=2, two_phase=False),
        "inplace r16 w1": lambda c: ct.compact_layers(c, table, keep, lens, block_r=16, num_warps=1, two_phase=False),
        "inplace r8 w1": lambda c: ct.compact_layers(c, table, keep, lens, block_r=8, num_warps=1, two_phase=False),
        "inplace r8 w2": lambda c: ct.compact_layers(c, table, keep, lens, block_r=8, num_warps=2, two_phase=False),
        "inplace r4 w1": lambda c: ct.compact_layers(c, table, keep, lens, block_r=4, num_warps=1, two_phase=False),
        "inplace r32 w2": lambda c: ct.compact_layers(c, table, keep, lens, block_r=32, num_warps=2, two_phase=False),
        "inplace r32 w1": lambda c: ct.compact_layers(c, table, keep, lens, block_r=32, num_warps=1, two_phase=False),
        "twophase r16 w2": lambda c: ct.compact_layers(c, table, keep, lens, block_r=16, num_warps=2, two_phase=True),
        "twophase r8 w1": lambda c: ct.compact_layers(c, table, keep, lens, block_r=8, num_warps=1, two_phase=True),
        "masked r16 w2": lambda c: masked(c, table, keep, lens, 16, 2),
        "masked r8 w1": lambda c: masked(c, table, keep, lens, 8, 1),
    }
    moved_bytes = L * batch * H * kept * W * 2 * 2
    row = {"batch": batch, "held": held, "kept": kept, "bytes_rw": moved_bytes}
    flat = torch.empty(moved_bytes // 4, dtype=torch.bfloat16, device="cuda")
    row["copy_same_bytes_us"] = do_bench(lambda: flat.clone()) * 1e3
    for name, fn in variants.items():
        work = [c.clone() for c in caches]
        fn(work)
        ok = all(torch.equal(a, b) for a, b in zip(work, ref))
        row[name] = {"us": do_bench(functools.partial(fn, work)) * 1e3, "identical": ok}
    print(json.dumps(row), flush=True)
    out.append(row)
    del caches, ref
    torch.cuda.empty_cache()
json.dump(out, open(sys.argv[1], "w"), indent=1)
