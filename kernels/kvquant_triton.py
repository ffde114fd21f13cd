"""Triton decode over a paged cache of KVQuant-style keys (layout and semantics:
:mod:`kvquant_ref`): per-channel 8/4-bit codes of the keys turned back to position 0, each
row's logical position after them (a cache that evicts), then the values as in
:mod:`lookat_ref` (16/8/4 bits).

One program per (request, KV head, context split), the structure of :mod:`dense_triton`: a
tile of rows is read once, its keys rebuilt in registers (``low + code * step``, the head's
calibrated grid) and turned to their positions by RoPE (``rotate_half`` pairs; cos / sin
rows looked up in :func:`rope_ref.table`, the reference's own float64-computed table, which
stays in L2), the GQA group scores them on tensor cores in the query's dtype, online softmax
in fp32, values accumulated with their scales folded into the probabilities
(:func:`lookat_triton._accumulate_values`), flash-decoding combine when split. So a token
costs its compact row plus one cached table row, never a dequantized copy in memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_kvcompress.kernels import rope_ref
from vllm_kvcompress.kernels.kvquant_ref import POSITION_BYTES, _key_bytes, key_steps
from vllm_kvcompress.kernels.lookat_ref import LookatLayout
from vllm_kvcompress.kernels.lookat_triton import _accumulate_values, _load_page, _load_values, _softmax_state
from vllm_kvcompress.kernels.triton_common import LOG2E, _mma, _next_pow2, _program_span, _store_partial, \
    launch_split, partition


@triton.jit
def _key_half(cache_ptr, row, valid, first: tl.constexpr, D: tl.constexpr, KEY_BITS: tl.constexpr):
    """Codes of channels ``first .. first + D/2`` as ``[N, D/2]`` fp32 (4 bits: channel ``2j``
    in the low nibble of byte ``j``)."""
    if KEY_BITS == 8:
        j = tl.arange(0, D // 2)
        return tl.load(cache_ptr + (row + first)[:, None] + j[None, :], mask=valid[:, None], other=0).to(tl.float32)
    j = tl.arange(0, D // 4)
    packed = tl.load(cache_ptr + (row + first // 2)[:, None] + j[None, :], mask=valid[:, None], other=0)
    both = tl.join(packed & 15, packed >> 4)  # [N, D/4, 2]: channels 2j, 2j + 1
    return tl.reshape(both, [packed.shape[0], D // 2]).to(tl.float32)


# num_splits varies with the batch: specialising on it (== 1, % 16) would compile
# mid-serving, outside the warm-up and the captured graphs.
@triton.jit(do_not_specialize=["num_splits"])
def _kvquant_decode_kernel(
        q_ptr, cache_ptr, cache_i8_ptr, cache_16_ptr, cache_f16_ptr, bt_ptr, lens_ptr, low_ptr, step_ptr, table_ptr,
        stride_qb, stride_qh, stride_bt, num_kv_heads, num_positions, qk_scale,
        out_ptr, ml_ptr, num_q_heads, num_splits,
        G: tl.constexpr, GD: tl.constexpr, D: tl.constexpr, KEY_BITS: tl.constexpr, HAS_POS: tl.constexpr,
        VOFF: tl.constexpr, ROW_BYTES: tl.constexpr, ALIGN: tl.constexpr, BS: tl.constexpr,
        VALUE_BITS: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, INTERP: tl.constexpr):
    b, h, split, kv_len, start, step = _program_span(lens_ptr, num_kv_heads, num_splits, BLOCK_N)
    HALF: tl.constexpr = D // 2
    KB: tl.constexpr = D * KEY_BITS // 8

    offs_n = tl.arange(0, BLOCK_N)
    j = tl.arange(0, HALF)
    r = tl.arange(0, GD)
    q_rows = q_ptr + b * stride_qb + (h * G + r)[:, None] * stride_qh
    q1 = tl.load(q_rows + j[None, :], mask=(r < G)[:, None], other=0.0)  # [GD, D/2]
    q2 = tl.load(q_rows + HALF + j[None, :], mask=(r < G)[:, None], other=0.0)
    low1 = tl.load(low_ptr + h * D + j)
    low2 = tl.load(low_ptr + h * D + HALF + j)
    step1 = tl.load(step_ptr + h * D + j)
    step2 = tl.load(step_ptr + h * D + HALF + j)

    m_i, l_i, acc, acc_odd = _softmax_state(GD, D, VALUE_BITS)
    for n0 in range(start, kv_len, step):
        pos = n0 + offs_n
        valid = pos < kv_len
        page = _load_page(bt_ptr, b, stride_bt, pos, valid, BS)
        slot = (page * num_kv_heads + h) * BS + pos % BS  # row index, int64
        row = tl.multiple_of(slot * ROW_BYTES, ALIGN)
        a = _key_half(cache_ptr, row, valid, 0, D, KEY_BITS) * step1[None, :] + low1[None, :]  # [N, D/2] at 0
        c = _key_half(cache_ptr, row, valid, HALF, D, KEY_BITS) * step2[None, :] + low2[None, :]
        if HAS_POS:  # the row's logical position, little-endian int32 after the key codes
            at = row + KB
            p = tl.load(cache_ptr + at, mask=valid, other=0).to(tl.int32)
            p |= tl.load(cache_ptr + at + 1, mask=valid, other=0).to(tl.int32) << 8
            p |= tl.load(cache_ptr + at + 2, mask=valid, other=0).to(tl.int32) << 16
            p |= tl.load(cache_ptr + at + 3, mask=valid, other=0).to(tl.int32) << 24
        else:
            p = pos.to(tl.int32)
        p = tl.minimum(tl.maximum(p, 0), num_positions - 1).to(tl.int64)  # in the table (start-up checks the bound)
        cos = tl.load(table_ptr + p[:, None] * D + j[None, :], mask=valid[:, None], other=1.0)
        sin = tl.load(table_ptr + p[:, None] * D + HALF + j[None, :], mask=valid[:, None], other=0.0)
        k1 = (a * cos - c * sin).to(q1.dtype)  # rotate_half: channel j turns with j + D/2
        k2 = (c * cos + a * sin).to(q1.dtype)
        s = (_mma(q1, tl.trans(k1), INTERP) + _mma(q2, tl.trans(k2), INTERP)) * qk_scale  # [GD, N], log2 domain
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        pr = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        acc = acc * alpha[:, None]
        if VALUE_BITS == 4:
            acc_odd = acc_odd * alpha[:, None]
        x, sc, lo = _load_values(row, slot, valid, cache_ptr, cache_i8_ptr, cache_16_ptr, cache_f16_ptr, VOFF, D,
                                 ROW_BYTES, VALUE_BITS)
        acc, acc_odd = _accumulate_values(pr, acc, acc_odd, x, sc, lo, VALUE_BITS, INTERP)
        m_i = m_new
    _store_partial(acc, acc_odd, m_i, l_i, out_ptr, ml_ptr, b, h, split, num_q_heads, num_splits,
                   G, GD, 0, D, SPLIT, VALUE_BITS == 4)


# From nothing yet: 64-token tiles, 4 warps, the dense kernel's defaults; to be swept on the GPU
# (benchmarks.kernels_kvquant).
DEFAULTS = {"block_n": 64, "num_warps": 4, "num_stages": 2, "programs_per_sm": 2.0, "min_part": 256}


def kvquant_decode(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, kv_lens: torch.Tensor,
                   ranges: torch.Tensor, key_bits: int, theta: float, layout: LookatLayout, scale: float, *,
                   max_kv_len: int | None = None, out_dtype: torch.dtype = torch.float32,
                   num_splits: int | None = None, max_position: int | None = None, **tune) -> torch.Tensor:
    """Same as ``kvquant_ref.decode_attention``: ``[B, Hq, D]``. ``max_position``: a bound on
    the rows' logical positions (default: the longest context for a cache that keeps every
    row, whose positions are its row indices; :data:`rope_ref.MAX_TABLE` for rows that carry
    their position)."""
    cfg = {**DEFAULTS, **tune}
    batch, num_q_heads, head_dim = query.shape
    num_kv_heads, block_size = cache.shape[1], cache.shape[2]
    if head_dim != layout.head_dim or cache.shape[-1] != layout.row_bytes or head_dim & (head_dim - 1) or \
            head_dim < 32:
        raise ValueError("query / cache do not match the layout, or head_dim is not a power of two >= 32")
    key_bytes = _key_bytes(head_dim, key_bits)
    has_positions = layout.m == key_bytes + POSITION_BYTES
    if not has_positions and layout.m != key_bytes:
        raise ValueError(f"layout.m {layout.m} is neither {key_bytes} key bytes nor those and a position")
    group = num_q_heads // num_kv_heads
    max_len = int(kv_lens.max()) if max_kv_len is None else int(max_kv_len)
    if max_position is None:
        max_position = rope_ref.MAX_TABLE if has_positions else max_len
    table = rope_ref.table(theta, head_dim, query.device, int(max_position))  # refuses more than it holds
    low, step = key_steps(ranges.to(query.device), key_bits)
    query = query if query.stride(-1) == 1 else query.contiguous()
    block_n = cfg["block_n"]
    num_splits = partition(batch, num_kv_heads, max_len, block_n, query.device, cfg, num_splits)
    value_16 = layout.value_dtype if layout.value_bits == 16 else torch.float16
    args = (query, cache, cache.view(torch.int8), cache.view(value_16), cache.view(torch.float16), block_table,
            kv_lens, low.contiguous(), step.contiguous(), table, query.stride(0), query.stride(1),
            block_table.stride(0), num_kv_heads, table.shape[0], float(scale * LOG2E))
    consts = dict(G=group, GD=max(16, _next_pow2(group)), D=head_dim, KEY_BITS=key_bits, HAS_POS=has_positions,
                  VOFF=layout.m, ROW_BYTES=layout.row_bytes, ALIGN=layout.row_bytes & -layout.row_bytes,
                  BS=block_size, VALUE_BITS=layout.value_bits, BLOCK_N=block_n)
    return launch_split(_kvquant_decode_kernel, batch * num_kv_heads, args, consts, query, num_splits, out_dtype,
                        cfg["num_warps"], cfg["num_stages"])
