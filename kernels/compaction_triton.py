"""Triton in-place compaction of a paged cache (reference: :mod:`compaction_ref`).

Two launch plans, same result:

* in place (many requests x heads): one program per (request, KV head) walks its kept
  rows in ascending tiles. Kept row ``j`` always comes from old row ``keep[j] >= j``, so
  a tile only reads rows no earlier tile wrote; within a tile, a barrier between the
  loads and the stores keeps a row from being overwritten before it is read.
* two-phase (few requests x heads, where one program per pair would leave the GPU
  idle): every tile of every pair gathers its kept rows into a scratch buffer, then a
  second launch scatters them to the front; launch order replaces the barrier.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _compact_kernel(cache_ptr, bt_ptr, keep_ptr, lens_ptr, stride_bt, stride_kr, stride_kh, num_kv_heads,
                    W: tl.constexpr, WP: tl.constexpr, BS: tl.constexpr, BLOCK_R: tl.constexpr):
    r = tl.program_id(0)
    h = tl.program_id(1)
    n = tl.load(lens_ptr + r)
    cols = tl.arange(0, WP)
    offs = tl.arange(0, BLOCK_R)
    for j0 in range(0, n, BLOCK_R):
        j = j0 + offs
        valid = j < n
        src = tl.load(keep_ptr + r * stride_kr + h * stride_kh + j, mask=valid, other=0)
        src_page = tl.load(bt_ptr + r * stride_bt + src // BS, mask=valid, other=0).to(tl.int64)
        dst_page = tl.load(bt_ptr + r * stride_bt + j // BS, mask=valid, other=0).to(tl.int64)
        src_row = ((src_page * num_kv_heads + h) * BS + src % BS) * W
        dst_row = ((dst_page * num_kv_heads + h) * BS + j % BS) * W
        m = valid[:, None] & (cols < W)[None, :]
        rows = tl.load(cache_ptr + src_row[:, None] + cols[None, :], mask=m)
        tl.debug_barrier()
        tl.store(cache_ptr + dst_row[:, None] + cols[None, :], rows, mask=m & (src != j)[:, None])


@triton.jit
def _move_kernel(cache_ptr, scratch_ptr, bt_ptr, keep_ptr, lens_ptr, stride_bt, stride_kr, stride_kh, num_kv_heads,
                 max_keep, GATHER: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, BS: tl.constexpr,
                 BLOCK_R: tl.constexpr):
    r = tl.program_id(0)
    h = tl.program_id(1)
    j = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, WP)
    valid = j < tl.load(lens_ptr + r)
    m = valid[:, None] & (cols < W)[None, :]
    staged = ((r * num_kv_heads + h) * max_keep + j).to(tl.int64) * W
    if GATHER:
        src = tl.load(keep_ptr + r * stride_kr + h * stride_kh + j, mask=valid, other=0)
        page = tl.load(bt_ptr + r * stride_bt + src // BS, mask=valid, other=0).to(tl.int64)
        rows = tl.load(cache_ptr + (((page * num_kv_heads + h) * BS + src % BS) * W)[:, None] + cols[None, :], mask=m)
        tl.store(scratch_ptr + staged[:, None] + cols[None, :], rows, mask=m)
    else:
        page = tl.load(bt_ptr + r * stride_bt + j // BS, mask=valid, other=0).to(tl.int64)
        rows = tl.load(scratch_ptr + staged[:, None] + cols[None, :], mask=m)
        tl.store(cache_ptr + (((page * num_kv_heads + h) * BS + j % BS) * W)[:, None] + cols[None, :], rows, mask=m)


def _programs_wanted(device: torch.device) -> int:
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 64


def compact_batch(cache: torch.Tensor, block_table: torch.Tensor, keep: torch.Tensor, keep_lens: torch.Tensor,
                  block_r: int = 32, num_warps: int = 4, two_phase: bool | None = None) -> None:
    """Same as ``compaction_ref.compact_batch``: ``keep[R, H, max_keep]`` ascending per
    (request, head), ``keep_lens[R]`` (int32 on the cache's device). ``two_phase``:
    None picks the plan from the number of (request, head) pairs."""
    num_reqs, num_kv_heads = keep.shape[0], cache.shape[1]
    if keep.shape[1] != num_kv_heads:
        raise ValueError(f"keep has {keep.shape[1]} heads, the cache {num_kv_heads}")
    if not num_reqs:
        return
    width = cache[0, 0, 0].numel()
    keep = keep if keep.stride(-1) == 1 else keep.contiguous()
    consts = dict(W=width, WP=triton.next_power_of_2(width), BS=cache.shape[2], BLOCK_R=block_r)
    if two_phase is None:
        two_phase = num_reqs * num_kv_heads < _programs_wanted(cache.device)
    if not two_phase:
        _compact_kernel[(num_reqs, num_kv_heads)](
            cache, block_table, keep, keep_lens, block_table.stride(0), keep.stride(0), keep.stride(1), num_kv_heads,
            num_warps=num_warps, **consts)
        return
    max_keep = keep.shape[2]
    scratch = torch.empty(num_reqs * num_kv_heads * max_keep * width, dtype=cache.dtype, device=cache.device)
    grid = (num_reqs, num_kv_heads, triton.cdiv(max_keep, block_r))
    for gather in (True, False):
        _move_kernel[grid](cache, scratch, block_table, keep, keep_lens, block_table.stride(0), keep.stride(0),
                           keep.stride(1), num_kv_heads, max_keep, GATHER=gather, num_warps=num_warps, **consts)
