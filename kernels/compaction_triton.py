"""Triton in-place compaction of a paged cache, and the key norms knorm scores it with
(reference: :mod:`compaction_ref`). Every layer of a step goes in one launch: the kernels
reach each layer's cache as an element offset from the first layer's.

Two launch plans for the move, same result:

* in place (many layers x requests x heads): one program per (layer, request, KV head) walks its kept
  rows in ascending tiles. Kept row ``j`` always comes from old row ``keep[j] >= j``, so
  a tile only reads rows no earlier tile wrote; within a tile, a barrier between the
  loads and the stores keeps a row from being overwritten before it is read.
* two-phase (few triples, where one program per triple would leave the GPU
  idle): every tile of every triple gathers its kept rows into a scratch buffer, then a
  second launch scatters them to the front; launch order replaces the barrier.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from vllm_kvcompress.kernels import compaction_ref


# The sizes of a step (requests, kept rows, lengths, the strides that follow from them) change
# every step: not specialised on, so a kernel compiles once per engine (at its warm-up), not
# again while serving whenever a size happens to be 1 or a multiple of 16.
STEP_SIZES = ["stride_bt", "stride_kl", "stride_kr", "stride_kh", "num_reqs"]


@triton.jit(do_not_specialize=STEP_SIZES)
def _compact_kernel(cache_ptr, layer_offs_ptr, bt_ptr, keep_ptr, lens_ptr, stride_bt, stride_kl, stride_kr, stride_kh,
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
        valid = j < n
        src = tl.load(keep + j, mask=valid, other=0)
        src_page = tl.load(bt_ptr + r * stride_bt + src // BS, mask=valid, other=0).to(tl.int64)
        dst_page = tl.load(bt_ptr + r * stride_bt + j // BS, mask=valid, other=0).to(tl.int64)
        src_row = ((src_page * num_kv_heads + h) * BS + src % BS) * W
        dst_row = ((dst_page * num_kv_heads + h) * BS + j % BS) * W
        m = valid[:, None] & (cols < W)[None, :]
        rows = tl.load(cache + src_row[:, None] + cols[None, :], mask=m)
        tl.debug_barrier()
        tl.store(cache + dst_row[:, None] + cols[None, :], rows, mask=m & (src != j)[:, None])


@triton.jit(do_not_specialize=STEP_SIZES + ["max_keep"])
def _move_kernel(cache_ptr, layer_offs_ptr, scratch_ptr, bt_ptr, keep_ptr, lens_ptr, stride_bt, stride_kl, stride_kr,
                 stride_kh, num_reqs, num_kv_heads, max_keep, GATHER: tl.constexpr, W: tl.constexpr,
                 WP: tl.constexpr, BS: tl.constexpr, BLOCK_R: tl.constexpr):
    pair = tl.program_id(0)  # layer * num_reqs + request
    layer = pair // num_reqs
    r = pair % num_reqs
    h = tl.program_id(1)
    cache = cache_ptr + tl.load(layer_offs_ptr + layer)
    j = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, WP)
    valid = j < tl.load(lens_ptr + r)
    m = valid[:, None] & (cols < W)[None, :]
    staged = ((pair * num_kv_heads + h).to(tl.int64) * max_keep + j) * W
    if GATHER:
        keep = keep_ptr + layer.to(tl.int64) * stride_kl + r * stride_kr + h * stride_kh
        src = tl.load(keep + j, mask=valid, other=0)
        page = tl.load(bt_ptr + r * stride_bt + src // BS, mask=valid, other=0).to(tl.int64)
        rows = tl.load(cache + (((page * num_kv_heads + h) * BS + src % BS) * W)[:, None] + cols[None, :], mask=m)
        tl.store(scratch_ptr + staged[:, None] + cols[None, :], rows, mask=m)
    else:
        page = tl.load(bt_ptr + r * stride_bt + j // BS, mask=valid, other=0).to(tl.int64)
        rows = tl.load(scratch_ptr + staged[:, None] + cols[None, :], mask=m)
        tl.store(cache + (((page * num_kv_heads + h) * BS + j % BS) * W)[:, None] + cols[None, :], rows, mask=m)


@triton.jit(do_not_specialize=["stride_bt", "num_reqs", "length"])
def _key_norms_kernel(cache_ptr, layer_offs_ptr, bt_ptr, out_ptr, stride_bt, num_reqs, num_kv_heads, length,
                      D: tl.constexpr, W: tl.constexpr, BS: tl.constexpr, BLOCK_T: tl.constexpr):
    pair = tl.program_id(0)  # layer * num_reqs + request
    r = pair % num_reqs
    h = tl.program_id(1)
    cache = cache_ptr + tl.load(layer_offs_ptr + pair // num_reqs)
    t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = t < length
    page = tl.load(bt_ptr + r * stride_bt + t // BS, mask=valid, other=0).to(tl.int64)
    row = ((page * num_kv_heads + h) * BS + t % BS) * W
    cols = tl.arange(0, D)
    key = tl.load(cache + row[:, None] + cols[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(key * key, axis=1))
    tl.store(out_ptr + (pair * num_kv_heads + h).to(tl.int64) * length + t, norm, mask=valid)


def _programs_wanted(device: torch.device) -> int:
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 64


def layer_offsets(caches: list[torch.Tensor]) -> torch.Tensor:
    """Each layer's cache as an element offset from the first one's (int64, on its device):
    one launch then reaches every layer through ``caches[0]`` (vLLM allocates the layers
    separately; their addresses differ by whole elements, allocations being aligned)."""
    size, base = caches[0].element_size(), caches[0].data_ptr()
    gaps = [c.data_ptr() - base for c in caches]
    if any(g % size for g in gaps):
        raise ValueError("layer caches are not element-aligned to each other")
    return _offsets_on(tuple(g // size for g in gaps), caches[0].device)


@functools.lru_cache(maxsize=64)
def _offsets_on(offsets: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # The caches live as long as the engine: the same layers ask for the same table every step.
    return torch.tensor(offsets, dtype=torch.int64).to(device)


def _check_layers(caches: list[torch.Tensor]) -> None:
    if not compaction_ref.same_layers(caches):
        raise ValueError("every layer's cache must be contiguous with the first one's shape, dtype and device")


# Tiles of 8 rows, one warp per program: on an H200 the in-place move of a decode compaction
# (32 layers x 8 KV heads, 16-256 requests of 272 -> 256 rows) ran 3.8x faster than with
# 32-row tiles and 4 warps, within 1.2x of a plain copy of the same bytes; the two-phase plan
# was as fast as with any other tile (results/2026-12-04/h200-eviction-6/compaction-tiles).
# Small programs keep many in flight per SM, and the serial tile walk of each is short.
BLOCK_ROWS, NUM_WARPS = 8, 1


def compact_layers(caches: list[torch.Tensor], block_table: torch.Tensor, keep: torch.Tensor, keep_lens: torch.Tensor,
                   block_r: int = BLOCK_ROWS, num_warps: int = NUM_WARPS, two_phase: bool | None = None) -> None:
    """Same as ``compaction_ref.compact_layers``: ``keep[L, R, H, max_keep]`` ascending per
    (layer, request, head), ``keep_lens[R]`` (int32 on the caches' device), one block table
    for every layer. One launch for all layers (two for few (layer, request, head) triples).
    ``two_phase``: None picks the plan from the number of triples."""
    num_layers, num_reqs, num_kv_heads = keep.shape[:3]
    if len(caches) != num_layers:
        raise ValueError(f"keep has {num_layers} layers, {len(caches)} caches given")
    if num_kv_heads != caches[0].shape[1]:
        raise ValueError(f"keep has {num_kv_heads} heads, the cache {caches[0].shape[1]}")
    if not num_reqs or not num_layers:
        return
    _check_layers(caches)
    cache = caches[0]
    offsets = layer_offsets(caches)
    width = cache[0, 0, 0].numel()
    keep = keep if keep.stride(-1) == 1 else keep.contiguous()
    strides = (block_table.stride(0), keep.stride(0), keep.stride(1), keep.stride(2), num_reqs, num_kv_heads)
    consts = dict(W=width, WP=triton.next_power_of_2(width), BS=cache.shape[2], BLOCK_R=block_r)
    if two_phase is None:
        two_phase = num_layers * num_reqs * num_kv_heads < _programs_wanted(cache.device)
    if not two_phase:
        _compact_kernel[(num_layers * num_reqs, num_kv_heads)](cache, offsets, block_table, keep, keep_lens, *strides,
                                                               num_warps=num_warps, **consts)
        return
    max_keep = keep.shape[3]
    scratch = torch.empty(num_layers * num_reqs * num_kv_heads * max_keep * width, dtype=cache.dtype,
                          device=cache.device)
    grid = (num_layers * num_reqs, num_kv_heads, triton.cdiv(max_keep, block_r))
    for gather in (True, False):
        _move_kernel[grid](cache, offsets, scratch, block_table, keep, keep_lens, *strides, max_keep, GATHER=gather,
                           num_warps=num_warps, **consts)


def compact_batch(cache: torch.Tensor, block_table: torch.Tensor, keep: torch.Tensor, keep_lens: torch.Tensor,
                  block_r: int = BLOCK_ROWS, num_warps: int = NUM_WARPS, two_phase: bool | None = None) -> None:
    """Same as ``compaction_ref.compact_batch``: :func:`compact_layers` of one layer."""
    compact_layers([cache], block_table, keep[None], keep_lens, block_r, num_warps, two_phase)


def key_norms(caches: list[torch.Tensor], block_table: torch.Tensor, length: int, block_t: int = 16,
              num_warps: int = 1) -> torch.Tensor:
    """Same as ``compaction_ref.key_norms``: L2 norms ``[L, R, H, length]`` (fp32) of the keys
    of dense ``[key | value]`` rows, every layer in one launch. 16 rows x 1 warp read the keys at a
    plain read's speed on the H200, 2.7x faster than the 64 x 4 tile before
    (results/2026-12-04/h200-eviction-8: 95 vs 260 us for 16 requests x 272 rows)."""
    _check_layers(caches)
    cache = caches[0]
    num_reqs, num_kv_heads, width = block_table.shape[0], cache.shape[1], cache.shape[-1]
    out = torch.empty(len(caches), num_reqs, num_kv_heads, length, dtype=torch.float32, device=cache.device)
    if out.numel():
        grid = (len(caches) * num_reqs, num_kv_heads, triton.cdiv(length, block_t))
        _key_norms_kernel[grid](cache, layer_offsets(caches), block_table, out, block_table.stride(0), num_reqs,
                                num_kv_heads, length, D=width // 2, W=width, BS=cache.shape[2], BLOCK_T=block_t,
                                num_warps=num_warps)
    return out
