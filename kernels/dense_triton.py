"""Triton bf16 paged decode over the dense layout of :mod:`paged_dense_ref`
(``cache[num_blocks, Hkv, block_size, 2 * D]``, rows ``[key | value]``): the baseline
that LOOKAT is timed against, built the same way as :mod:`lookat_triton` (one program
per request x KV head x context partition, the GQA group as the rows of ``tl.dot``,
online softmax in fp32, flash-decoding combine), so the two differ only in what a
token costs to read and score.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_kvcompress.kernels.triton_common import (LOG2E, _mma, _next_pow2, _program_span, _store_partial,
                                                   launch_split, partition)


# num_splits varies with the batch: specialising on it (== 1, % 16) would compile
# mid-serving, outside the warm-up and the captured graphs.
@triton.jit(do_not_specialize=["num_splits"])
def _dense_decode_kernel(q_ptr, cache_ptr, bt_ptr, lens_ptr, stride_qb, stride_qh, stride_bt, num_kv_heads, qk_scale,
                         out_ptr, ml_ptr, num_q_heads, num_splits,
                         G: tl.constexpr, GD: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                         BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, INTERP: tl.constexpr):
    b, h, split, kv_len, start, step = _program_span(lens_ptr, num_kv_heads, num_splits, BLOCK_N)

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    r = tl.arange(0, GD)
    q = tl.load(q_ptr + b * stride_qb + (h * G + r)[:, None] * stride_qh + offs_d[None, :],
                mask=(r < G)[:, None], other=0.0)
    q = q.to(cache_ptr.dtype.element_ty)  # [GD, D]; scaled in fp32 after the dot

    m_i = tl.full([GD], float("-inf"), tl.float32)
    l_i = tl.zeros([GD], tl.float32)
    acc = tl.zeros([GD, D], tl.float32)
    for n0 in range(start, kv_len, step):
        pos = n0 + offs_n
        valid = pos < kv_len
        page = tl.load(bt_ptr + b * stride_bt + pos // BS, mask=valid, other=0).to(tl.int64)
        row = ((page * num_kv_heads + h) * BS + pos % BS) * (2 * D)
        k = tl.load(cache_ptr + row[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)  # [N, D]
        v = tl.load(cache_ptr + row[:, None] + D + offs_d[None, :], mask=valid[:, None], other=0.0)
        s = _mma(q, tl.trans(k), INTERP) * qk_scale  # [GD, N], log2 domain
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, INTERP)
        m_i = m_new
    _store_partial(acc, acc, m_i, l_i, out_ptr, ml_ptr, b, h, split, num_q_heads, num_splits, G, GD, 0, D, SPLIT,
                   False)


# From benchmarks.kernels_lookat --sweep on an H100: 128-token tiles for head_dim 64, 64 for
# 128; 4 warps; Triton's default 3-stage pipelining (cp.async of K/V); ~2 programs per SM.
DEFAULTS = {"block_n": None, "num_warps": 4, "num_stages": 3, "programs_per_sm": 2.0, "min_part": 256}


def tile_tokens(head_dim: int, cfg: dict = DEFAULTS) -> int:
    """Tokens per tile (``BLOCK_N``): the tuning's, or by head size."""
    return cfg["block_n"] or (128 if head_dim <= 64 else 64)


def dense_decode(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, kv_lens: torch.Tensor,
                 scale: float, *, max_kv_len: int | None = None, out_dtype: torch.dtype = torch.float32,
                 num_splits: int | None = None, **tune) -> torch.Tensor:
    """Same as ``paged_dense_ref.decode_attention``: ``[B, Hq, D]``. Arguments as
    :func:`lookat_triton.lookat_decode` (the query is rounded to the cache dtype for
    the tensor-core ``q @ k``, as flash-decoding kernels do; the scale is applied in fp32)."""
    cfg = {**DEFAULTS, **tune}
    batch, num_q_heads, head_dim = query.shape
    num_kv_heads, block_size = cache.shape[1], cache.shape[2]
    if cache.shape[-1] != 2 * head_dim or head_dim & (head_dim - 1):
        raise ValueError("cache rows must be [key | value] of the query's head_dim, a power of two")
    group = num_q_heads // num_kv_heads
    max_len = int(kv_lens.max()) if max_kv_len is None else int(max_kv_len)
    block_n = tile_tokens(head_dim, cfg)
    num_splits = partition(batch, num_kv_heads, max_len, block_n, query.device, cfg, num_splits)
    query = query if query.stride(-1) == 1 else query.contiguous()
    args = (query, cache, block_table, kv_lens, query.stride(0), query.stride(1), block_table.stride(0),
            num_kv_heads, float(scale * LOG2E))
    consts = dict(G=group, GD=max(16, _next_pow2(group)), D=head_dim, BS=block_size, BLOCK_N=block_n)
    return launch_split(_dense_decode_kernel, batch * num_kv_heads, args, consts, query, num_splits, out_dtype,
                        cfg["num_warps"], cfg["num_stages"])
