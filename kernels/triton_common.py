"""Triton pieces shared by the paged decode kernels (:mod:`lookat_triton`, :mod:`dense_triton`):
one program per (request, KV head, context split) with the GQA group as the rows of
``tl.dot``, the store of a program's partial result, and the flash-decoding plan and
combine of the splits (:func:`partition`, :func:`launch_split`).

Splits interleave tiles: split ``s`` of ``S`` takes tiles ``s, s + S, s + 2S, ...`` of
``BLOCK_N`` tokens up to the request's length. So the number of splits can be planned from
the batch and the SM count alone, never from the lengths, and still divide any context
evenly: a CUDA graph captured for ``max_model_len`` keeps every program busy at any length
(contiguous ranges sized for ``max_model_len`` left most programs idle on short contexts).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Triton's interpreter multiplies bf16 dot operands as their raw uint16 bits (seen with
# triton 3.9); under it, dots upcast their (already rounded) operands to fp32 first.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


@triton.jit
def _program_span(lens_ptr, num_kv_heads, num_splits, BLOCK_N: tl.constexpr):
    """This program's request, KV head, split, the request's length, the split's first token
    and the stride between its tiles (tiles interleave across splits)."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // num_kv_heads
    h = bh % num_kv_heads
    kv_len = tl.load(lens_ptr + b)
    return b, h, split, kv_len, split * BLOCK_N, num_splits * BLOCK_N


@triton.jit
def _mma(a, b, UPCAST: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b)


@triton.jit
def _store_partial(acc, acc_odd, m_i, l_i, out_ptr, ml_ptr, b, h, split, num_q_heads, num_splits,
                   G: tl.constexpr, GD: tl.constexpr, PAD_LOG: tl.constexpr, D: tl.constexpr,
                   SPLIT: tl.constexpr, HALVES: tl.constexpr):
    """Rows ``r`` of the widened group with ``r % 2**PAD_LOG == 0`` are the real heads.
    ``HALVES``: ``acc`` / ``acc_odd`` hold the even / odd output columns."""
    r = tl.arange(0, GD)
    head = h * G + (r >> PAD_LOG)
    keep = ((r & ((1 << PAD_LOG) - 1)) == 0) & ((r >> PAD_LOG) < G)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    row = b.to(tl.int64) * num_q_heads + head  # [GD]
    if SPLIT:
        row = row * num_splits + split
        tl.store(ml_ptr + row, m_i + tl.log2(l_safe), mask=keep)
    if HALVES:
        j = tl.arange(0, D // 2)
        tl.store(out_ptr + row[:, None] * D + 2 * j[None, :], (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty),
                 mask=keep[:, None])
        tl.store(out_ptr + row[:, None] * D + 2 * j[None, :] + 1,
                 (acc_odd / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=keep[:, None])
    else:
        d = tl.arange(0, D)
        tl.store(out_ptr + row[:, None] * D + d[None, :], (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty),
                 mask=keep[:, None])


@triton.jit(do_not_specialize=["num_splits"])
def _combine_kernel(part_ptr, ml_ptr, out_ptr, num_splits, SP: tl.constexpr, D: tl.constexpr):
    """out[b, h] = sum_s 2^(lse_s - lse) o_s over the splits that held tokens (a split with
    none stored lse = -inf)."""
    row = tl.program_id(0)  # b * Hq + h
    s = tl.arange(0, SP)
    d = tl.arange(0, D)
    base = row.to(tl.int64) * num_splits
    lse = tl.load(ml_ptr + base + s, mask=s < num_splits, other=float("-inf"))
    keep = lse > float("-inf")
    w = tl.exp2(lse - tl.max(lse, axis=0))
    w = tl.where(keep, w, 0.0)
    o = tl.load(part_ptr + (base + s)[:, None] * D + d[None, :], mask=keep[:, None], other=0.0)
    total = tl.sum(w, axis=0)
    # A request with no tokens (vLLM's padding rows in a CUDA graph) gets zeros, not 0 / 0.
    out = tl.sum(o * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row.to(tl.int64) * D + d, out.to(out_ptr.dtype.element_ty))


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def partition(batch, num_kv_heads, max_len, block_n, device, cfg, num_splits=None) -> int:
    """The number of splits: planned from the SM count (:func:`plan_splits`), or forced."""
    if num_splits is None:
        return plan_splits(batch, num_kv_heads, max_len, block_n, num_sms(device), cfg["programs_per_sm"],
                           cfg["min_part"])
    return max(1, min(int(num_splits), triton.cdiv(max_len, block_n)))


def plan_splits(batch: int, num_kv_heads: int, max_len: int, block_n: int, sms: int,
                programs_per_sm: float = 2.0, min_part: int = 256) -> int:
    """Splits per (request, KV head): enough programs to fill the GPU, but no more than give
    each split ``min_part`` tokens of a ``max_len``-token context. ``max_len`` is only a
    bound (a graph's ``max_model_len``): tiles interleave, so shorter contexts are divided
    evenly too. Always a power of two: the few values vLLM's graph capture meets (batch
    sizes 1..512 at ``max_model_len``) are every value a later eager batch can ask for, so
    no kernel (the combine's ``SP`` block) is compiled mid-serving."""
    want = _pow2_at_least(math.ceil(programs_per_sm * sms / (batch * num_kv_heads)))
    cap = max(1, max_len // max(min_part, block_n))
    return min(want, 1 << (cap.bit_length() - 1))


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def combine(partial: torch.Tensor, lse: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    batch, num_q_heads, num_splits, head_dim = partial.shape
    _combine_kernel[(batch * num_q_heads,)](partial, lse, out, num_splits, SP=_next_pow2(num_splits), D=head_dim,
                                            num_warps=4)
    return out


def launch_split(kernel, grid_bh: int, args: tuple, consts: dict, query: torch.Tensor, num_splits: int,
                 out_dtype: torch.dtype, num_warps: int, num_stages: int | None) -> torch.Tensor:
    """Run ``kernel`` over ``(grid_bh, num_splits)`` programs; combine when split."""
    batch, num_q_heads, head_dim = query.shape
    out = torch.empty(batch, num_q_heads, head_dim, dtype=out_dtype, device=query.device)
    extra = {} if num_stages is None else {"num_stages": num_stages}
    if num_splits == 1:
        kernel[(grid_bh, 1)](*args, out, out, num_q_heads, 1, **consts, SPLIT=False, INTERP=INTERPRET,
                             num_warps=num_warps, **extra)
        return out
    partial = torch.empty(batch, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=query.device)
    lse = torch.empty(batch, num_q_heads, num_splits, dtype=torch.float32, device=query.device)
    kernel[(grid_bh, num_splits)](*args, partial, lse, num_q_heads, num_splits, **consts, SPLIT=True,
                                  INTERP=INTERPRET,
                                  num_warps=num_warps, **extra)
    return combine(partial, lse, out)
