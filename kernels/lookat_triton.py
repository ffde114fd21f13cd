"""Triton kernels for LOOKAT decode: ADC lookup tables and fused paged attention over
PQ-coded keys (layout and semantics: :mod:`lookat_ref`).

:func:`lookat_decode` = two or three launches:

1. Scoring material. ``score="adc"``: :func:`build_lut`, the ADC tables of every query
   head, premultiplied by ``scale * log2(e)`` (logits land in the ``exp2`` domain) and
   stored **group-innermost**, ``lut[B, Hkv, m, K, GL]`` (``GL`` = the GQA group rounded
   up to a power of two, padded heads zero): the ``group`` entries one code selects are one
   contiguous 16/32-byte vector, so a (token, subspace) costs one vector gather instead
   of ``group`` scalar ones (:func:`adc_tables` gives the reference's ``[B, Hq, m, K]``).
   ``score="rebuilt"`` (default): nothing per request; the bf16 codebooks (a per-layer
   constant, 32-64 KiB per KV head, shared by every request so they stay in L1).
2. ``_lookat_decode_kernel``, one program per (request, KV head, context partition):
   codes ``[N, m]`` straight from the paged rows; "adc" gathers ``[N, m, GL]`` table
   vectors and sums over ``m``; "rebuilt" gathers ``[N, m, D/m]`` centroids, reshapes them
   to keys ``[N, D]`` and scores the group on tensor cores. Online softmax in fp32; values
   dequantized by folding the per-token scale into the probabilities (integers 0..15 /
   -127..127 are exact in fp16, so ``p @ v`` on tensor cores sees exact values), ``+ p @
   min`` for 4-bit, whose low / high nibbles (even / odd columns) go through two ``tl.dot``
   into two accumulators. The next tile's rows (and the block-table entries of the one
   after) are loaded before the current tile is computed.
3. ``_combine_kernel`` (:mod:`triton_common`, shared with :mod:`dense_triton`):
   flash-decoding reduce of the partitions, only when the context is split (small batch x
   long context).

The GQA group is widened to ``GD >= 16`` rows for ``tl.dot`` (ADC: each head's logits
duplicated with ``tl.join``; rebuilt: zero query rows); only the real rows are stored.
Where the time goes on an H100 (results/2026-11-24/h100-lookat-kernels/NOTES.md): the
per-token gathers through L1 (one wavefront per distinct line), not DRAM bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_kvcompress.kernels.lookat_ref import LookatLayout
from vllm_kvcompress.kernels.triton_common import (LOG2E, _mma, _next_pow2, _program_span, _store_partial,
                                                   launch_split, partition)
# Names callers have long read from here (lookat_triton.INTERPRET / .plan_splits).
from vllm_kvcompress.kernels.triton_common import INTERPRET, plan_splits  # noqa: F401


# --------------------------------------------------------------------------- tables


@triton.jit
def _adc_table_kernel(q_ptr, cb_ptr, lut_ptr, num_kv_heads, stride_qb, stride_qh, mult,
                      G: tl.constexpr, GL: tl.constexpr, M: tl.constexpr, K: tl.constexpr,
                      SUB: tl.constexpr, SUBP: tl.constexpr, BLOCK_K: tl.constexpr):
    bh = tl.program_id(0)  # request * Hkv + kv head
    i = tl.program_id(1)  # subspace
    kb = tl.program_id(2)
    b = bh // num_kv_heads
    h = bh % num_kv_heads
    g = tl.arange(0, GL)
    s = tl.arange(0, SUBP)
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    q = tl.load(q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh + i * SUB + s[None, :],
                mask=(g[:, None] < G) & (s[None, :] < SUB), other=0.0).to(tl.float32)  # [GL, SUBP]
    c = tl.load(cb_ptr + ((h * M + i) * K + k)[:, None] * SUB + s[None, :],
                mask=(k[:, None] < K) & (s[None, :] < SUB), other=0.0)  # [BLOCK_K, SUBP]
    t = tl.sum(c[:, None, :] * q[None, :, :], axis=2) * mult  # [BLOCK_K, GL]
    base = lut_ptr + (bh.to(tl.int64) * M + i) * K * GL
    tl.store(base + k[:, None] * GL + g[None, :], t.to(lut_ptr.dtype.element_ty), mask=k[:, None] < K)


def build_lut(query: torch.Tensor, codebooks: torch.Tensor, mult: float = 1.0,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``lut[B, Hkv, m, K, GL] = mult * <q_{h*G+g}[i], C_h[i][k]>`` (``g >= G``: 0)."""
    batch, num_q_heads, _ = query.shape
    num_kv_heads, m, num_codes, sub = codebooks.shape
    group = num_q_heads // num_kv_heads
    gl = _next_pow2(group)
    query = query if query.stride(-1) == 1 else query.contiguous()
    codebooks = codebooks.float().contiguous()
    lut = torch.empty(batch, num_kv_heads, m, num_codes, gl, dtype=dtype, device=query.device)
    block_k = min(64, _next_pow2(num_codes))
    grid = (batch * num_kv_heads, m, triton.cdiv(num_codes, block_k))
    _adc_table_kernel[grid](query, codebooks, lut, num_kv_heads, query.stride(0), query.stride(1), float(mult),
                            G=group, GL=gl, M=m, K=num_codes, SUB=sub, SUBP=_next_pow2(sub), BLOCK_K=block_k,
                            num_warps=4)
    return lut


def adc_tables(query: torch.Tensor, codebooks: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[B, Hq, m, K]`` like :func:`pq_ref.adc_tables` per request (a copy, for checks)."""
    lut = build_lut(query, codebooks, 1.0, dtype)
    group = query.shape[1] // codebooks.shape[0]
    return lut[..., :group].permute(0, 1, 4, 2, 3).flatten(1, 2)


# --------------------------------------------------------------------------- decode


@triton.jit
def _widen(x, N: tl.constexpr, W: tl.constexpr, PAD_LOG: tl.constexpr):
    """``[N, W] -> [N, W << PAD_LOG]``: column ``c * 2**PAD_LOG + j`` is ``x[:, c]``."""
    if PAD_LOG >= 1:
        x = tl.reshape(tl.join(x, x), [N, 2 * W])
    if PAD_LOG >= 2:
        x = tl.reshape(tl.join(x, x), [N, 4 * W])
    if PAD_LOG >= 3:
        x = tl.reshape(tl.join(x, x), [N, 8 * W])
    if PAD_LOG >= 4:
        x = tl.reshape(tl.join(x, x), [N, 16 * W])
    return x


@triton.jit
def _load_page(bt_ptr, b, stride_bt, pos, valid, BS: tl.constexpr):
    return tl.load(bt_ptr + b * stride_bt + pos // BS, mask=valid, other=0).to(tl.int64)


@triton.jit
def _load_rows(pos, valid, page, h, num_kv_heads, cache_ptr, cache_i8_ptr, cache_16_ptr, cache_f16_ptr,
               M: tl.constexpr, D: tl.constexpr, ROW_BYTES: tl.constexpr, ALIGN: tl.constexpr, BS: tl.constexpr,
               VALUE_BITS: tl.constexpr):
    """Codes ``[N, M]`` and value payload / scale / minimum of the tile's rows."""
    slot = (page * num_kv_heads + h) * BS + pos % BS  # row index, int64
    # Alignment hint: every row starts at a multiple of ALIGN bytes (the largest power of two
    # dividing ROW_BYTES), and no more: without it Triton 3.6 assumed more for 8-bit rows
    # and issued misaligned 4-byte copies.
    row = tl.multiple_of(slot * ROW_BYTES, ALIGN)
    codes = tl.load(cache_ptr + row[:, None] + tl.arange(0, M)[None, :], mask=valid[:, None], other=0)
    x, sc, lo = _load_values(row, slot, valid, cache_ptr, cache_i8_ptr, cache_16_ptr, cache_f16_ptr, M, D, ROW_BYTES,
                             VALUE_BITS)
    return codes, x, sc, lo


@triton.jit
def _load_values(row, slot, valid, cache_ptr, cache_i8_ptr, cache_16_ptr, cache_f16_ptr,
                 M: tl.constexpr, D: tl.constexpr, ROW_BYTES: tl.constexpr, VALUE_BITS: tl.constexpr):
    """Value payload / scale / minimum of rows ``slot`` (byte offsets ``row``) whose values
    start at byte ``M`` (:class:`lookat_ref.LookatLayout`, shared with :mod:`kvquant_triton`)."""
    zero = tl.zeros(slot.shape, tl.float32)
    if VALUE_BITS == 16:
        d = tl.arange(0, D)
        x = tl.load(cache_16_ptr + (slot * (ROW_BYTES // 2) + M // 2)[:, None] + d[None, :],
                    mask=valid[:, None], other=0.0)  # [N, D] bf16 / fp16
        sc = zero
        lo = zero
    elif VALUE_BITS == 8:
        d = tl.arange(0, D)
        x = tl.load(cache_i8_ptr + (row + M)[:, None] + d[None, :], mask=valid[:, None], other=0)  # [N, D] int8
        sc = tl.load(cache_f16_ptr + slot * (ROW_BYTES // 2) + (M + D) // 2, mask=valid, other=0.0).to(tl.float32)
        lo = zero
    else:
        j = tl.arange(0, D // 2)
        x = tl.load(cache_ptr + (row + M)[:, None] + j[None, :], mask=valid[:, None], other=0)  # [N, D/2] uint8
        prm = slot * (ROW_BYTES // 2) + (M + D // 2) // 2
        sc = tl.load(cache_f16_ptr + prm, mask=valid, other=0.0).to(tl.float32)
        lo = tl.load(cache_f16_ptr + prm + 1, mask=valid, other=0.0).to(tl.float32)
    return x, sc, lo


@triton.jit
def _softmax_state(GD: tl.constexpr, D: tl.constexpr, VALUE_BITS: tl.constexpr):
    """An online softmax's start for ``GD`` query rows: running max, sum and value accumulators
    (4-bit values: even / odd columns, low / high nibbles, in two; else the second is unused)."""
    m_i = tl.full([GD], float("-inf"), tl.float32)
    l_i = tl.zeros([GD], tl.float32)
    if VALUE_BITS == 4:
        acc = tl.zeros([GD, D // 2], tl.float32)
        acc_odd = tl.zeros([GD, D // 2], tl.float32)
    else:
        acc = tl.zeros([GD, D], tl.float32)
        acc_odd = tl.zeros([GD, 1], tl.float32)
    return m_i, l_i, acc, acc_odd


@triton.jit
def _accumulate_values(pt, acc, acc_odd, x, sc, lo, VALUE_BITS: tl.constexpr, INTERP: tl.constexpr):
    """``acc (+ acc_odd) += pt @ values`` for probabilities ``pt[GD, N]`` (fp32); the per-token
    scale is folded into ``pt`` so the integers reach the tensor cores exactly (fp16)."""
    if VALUE_BITS == 16:
        acc += _mma(pt.to(x.dtype), x, INTERP)
    elif VALUE_BITS == 8:
        acc += _mma((pt * sc[None, :]).to(tl.float16), x.to(tl.float16), INTERP)
    else:
        ps = (pt * sc[None, :]).to(tl.float16)
        shift = tl.sum(pt * lo[None, :], axis=1)[:, None]  # sum_n p_n * min_n
        acc += _mma(ps, (x & 15).to(tl.float16), INTERP) + shift  # element 2j: low nibble
        acc_odd += _mma(ps, (x >> 4).to(tl.float16), INTERP) + shift
    return acc, acc_odd


# num_splits varies with the batch: specialising on it (== 1, % 16) would compile
# mid-serving, outside the warm-up and the captured graphs.
@triton.jit(do_not_specialize=["num_splits"])
def _lookat_decode_kernel(
        lut_ptr, cache_ptr, cache_i8_ptr, cache_16_ptr, cache_f16_ptr, bt_ptr, lens_ptr, stride_bt, num_kv_heads,
        q_ptr, stride_qb, stride_qh, qk_scale,
        out_ptr, ml_ptr, num_q_heads, num_splits,
        G: tl.constexpr, GL: tl.constexpr, GD: tl.constexpr, PAD_LOG: tl.constexpr,
        M: tl.constexpr, K: tl.constexpr, D: tl.constexpr,
        ROW_BYTES: tl.constexpr, ALIGN: tl.constexpr, BS: tl.constexpr, VALUE_BITS: tl.constexpr,
        SCORE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, INTERP: tl.constexpr):
    """SCORE 0: ADC, one ``[N, M, GL]`` gather of table vectors summed over M; SCORE 2: keys
    rebuilt from the codebooks (``lut_ptr`` = codebooks ``[Hkv, M, K, D/M]`` in bf16,
    gathered as ``[N, M, D/M]`` centroids, reshaped to ``[N, D]``) and ``q @ k`` on tensor
    cores. Rows are prefetched one tile ahead (block-table entries two): the table / codebook
    gathers must stay plain L1-cached loads, so Triton's own pipelining (``num_stages > 1``,
    which copies them with ``cp.async.cg``, past L1) is left off."""
    b, h, split, kv_len, start, step = _program_span(lens_ptr, num_kv_heads, num_splits, BLOCK_N)

    offs_n = tl.arange(0, BLOCK_N)
    offs_i = tl.arange(0, M)
    SUB: tl.constexpr = D // M
    if SCORE == 2:
        r = tl.arange(0, GD)
        d = tl.arange(0, D)
        qv = tl.load(q_ptr + b * stride_qb + (h * G + r)[:, None] * stride_qh + d[None, :],
                     mask=(r < G)[:, None], other=0.0).to(lut_ptr.dtype.element_ty)  # [GD, D]
        base = lut_ptr + h * (M * K * SUB)
        offs = (offs_i * (K * SUB))[None, :, None] + tl.arange(0, SUB)[None, None, :]  # [1, M, SUB]
        VEC: tl.constexpr = SUB
    else:
        base = lut_ptr + (b * num_kv_heads + h).to(tl.int64) * (M * K * GL)
        offs = (offs_i * (K * GL))[None, :, None] + tl.arange(0, GL)[None, None, :]  # [1, M, GL]
        VEC: tl.constexpr = GL

    m_i, l_i, acc, acc_odd = _softmax_state(GD, D, VALUE_BITS)

    pos = start + offs_n
    page = _load_page(bt_ptr, b, stride_bt, pos, pos < kv_len, BS)
    codes, x, sc, lo = _load_rows(pos, pos < kv_len, page, h, num_kv_heads, cache_ptr, cache_i8_ptr, cache_16_ptr,
                                  cache_f16_ptr, M, D, ROW_BYTES, ALIGN, BS, VALUE_BITS)
    page_next = _load_page(bt_ptr, b, stride_bt, pos + step, pos + step < kv_len, BS)
    for n0 in range(start, kv_len, step):
        # prefetch: block-table entries of this split's tile + 2, rows of tile + 1 (masked off past the end)
        pos2 = n0 + 2 * step + offs_n
        page_after = _load_page(bt_ptr, b, stride_bt, pos2, pos2 < kv_len, BS)
        pos1 = n0 + step + offs_n
        codes1, x1, sc1, lo1 = _load_rows(pos1, pos1 < kv_len, page_next, h, num_kv_heads, cache_ptr, cache_i8_ptr,
                                          cache_16_ptr, cache_f16_ptr, M, D, ROW_BYTES, ALIGN, BS, VALUE_BITS)

        valid = (n0 + offs_n) < kv_len
        idx = offs + (codes.to(tl.int32) * VEC)[:, :, None]  # [N, M, VEC]: one vector per (token, subspace)
        idx = tl.max_contiguous(tl.multiple_of(idx, [1, 1, VEC]), [1, 1, VEC])
        t = tl.load(base + idx, cache_modifier=".ca")
        if SCORE == 2:
            s = _mma(qv, tl.trans(tl.reshape(t, [BLOCK_N, D])), INTERP) * qk_scale  # [GD, N], log2 domain
        else:
            s = tl.trans(_widen(tl.sum(t.to(tl.float32), axis=1), BLOCK_N, GL, PAD_LOG))  # [GD, N], log2 domain
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # [GD, N]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        if VALUE_BITS == 4:
            acc_odd = acc_odd * alpha[:, None]
        acc, acc_odd = _accumulate_values(p, acc, acc_odd, x, sc, lo, VALUE_BITS, INTERP)
        m_i = m_new

        codes, x, sc, lo = codes1, x1, sc1, lo1
        page_next = page_after
    _store_partial(acc, acc_odd, m_i, l_i, out_ptr, ml_ptr, b, h, split, num_q_heads, num_splits,
                   G, GD, PAD_LOG, D, SPLIT, VALUE_BITS == 4)


DEFAULTS = {"score": "rebuilt", "block_n": 128, "num_warps": 4, "num_stages": 1, "programs_per_sm": 2.0,
            "min_part": 256, "lut_dtype": torch.float32}
SCORES = {"adc": 0, "rebuilt": 2}


def lookat_decode(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, kv_lens: torch.Tensor,
                  codebooks: torch.Tensor, layout: LookatLayout, scale: float, dims: torch.Tensor | None = None,
                  *, max_kv_len: int | None = None, out_dtype: torch.dtype = torch.float32,
                  num_splits: int | None = None, lut: torch.Tensor | None = None, **tune) -> torch.Tensor:
    """Same as ``lookat_ref.decode_attention(..., current=None)``: ``[B, Hq, D]``.

    ``max_kv_len``: host copy of ``kv_lens.max()`` (else read back, a device sync).
    ``num_splits``: force the number of context partitions (else :func:`plan_splits`).
    ``tune``: overrides of :func:`tuned` / :data:`DEFAULTS`: ``score`` ("rebuilt", the
    default and the faster on an H100 at every measured shape: no tables, keys rebuilt from
    bf16 codebooks, one centroid vector per token and subspace, scored on tensor cores;
    "adc": per-request ADC tables in fp32 logits, one gather of ``[N, m, GL]`` vectors per
    tile, closest to the reference),
    block_n, num_warps, num_stages, programs_per_sm, min_part, lut_dtype. ``lut``: a
    prebuilt :func:`build_lut` (``mult = scale * log2(e)``), or for "rebuilt" the
    codebooks already in bf16, to leave the conversion out of a timed call.
    """
    batch, num_q_heads, head_dim = query.shape
    num_kv_heads, m, num_codes, _ = codebooks.shape
    cfg = {**DEFAULTS, **tuned(head_dim, m, layout.value_bits, batch, tune.get("score", DEFAULTS["score"])), **tune}
    score = SCORES[cfg["score"]]
    if head_dim != layout.head_dim or m != layout.m or cache.shape[-1] != layout.row_bytes:
        raise ValueError("query / codebooks / cache do not match the layout")
    if head_dim & (head_dim - 1):
        raise ValueError(f"head_dim {head_dim} must be a power of two")  # so is m, a divisor
    group = num_q_heads // num_kv_heads
    if dims is not None:
        query = query[..., dims.flatten().to(query.device)]
    query = query if query.stride(-1) == 1 else query.contiguous()
    gl = _next_pow2(group)
    gd = max(16, gl)
    pad_log = (gd // gl).bit_length() - 1
    if score == 2:
        if lut is None:
            lut = codebooks.to(torch.bfloat16).contiguous()
        pad_log = 0  # rows of the group are the query heads themselves
    elif lut is None:
        lut = build_lut(query, codebooks, scale * LOG2E, cfg["lut_dtype"])
    max_len = int(kv_lens.max()) if max_kv_len is None else int(max_kv_len)
    block_n = cfg["block_n"]
    num_splits = partition(batch, num_kv_heads, max_len, block_n, query.device, cfg, num_splits)
    value_16 = layout.value_dtype if layout.value_bits == 16 else torch.float16
    args = (lut, cache, cache.view(torch.int8), cache.view(value_16), cache.view(torch.float16),
            block_table, kv_lens, block_table.stride(0), num_kv_heads,
            query, query.stride(0), query.stride(1), float(scale * LOG2E))
    consts = dict(G=group, GL=gl, GD=gd, PAD_LOG=pad_log, M=m, K=num_codes, D=head_dim,
                  ROW_BYTES=layout.row_bytes, ALIGN=layout.row_bytes & -layout.row_bytes, BS=cache.shape[2],
                  VALUE_BITS=layout.value_bits, SCORE=score, BLOCK_N=block_n)
    return launch_split(_lookat_decode_kernel, batch * num_kv_heads, args, consts, query, num_splits, out_dtype,
                        cfg["num_warps"], cfg["num_stages"])


def tuned(head_dim: int, m: int, value_bits: int, batch: int, score: str = "rebuilt") -> dict:
    """Launch parameters, from ``benchmarks.kernels_lookat --sweep`` on an H100 (Triton 3.6),
    see results/2026-11-24/h100-lookat-kernels: 4 warps, no Triton pipelining
    (``num_stages=1``: with stages, Triton copies the table / codebook gathers with
    ``cp.async.cg``, which skips L1, where they must hit; rows are prefetched by hand instead).
    "rebuilt": 128-token tiles, ~2 programs per SM (H200, Llama-3-8B shape, m=16, int4 values:
    156.6 / 159.0 / 174.5 us at 1 / 2 / 8 programs per SM for B=32 x 4K, 48.4 / 51.3 / 56.9 us
    for B=1 x 32K, results/2026-12-03/h200-engine-quick-5/kernels-decode; on the H100 2 was best
    or within 1% at B=1 and 1-23% behind 1 or 8 at B=64). The kernel holds 239 registers per
    thread, so two 4-warp programs fit an SM at a time: more splits only add combine work.
    "adc": fp32 tables (fp16 was never faster), 128-token tiles at head_dim 64 and 64 at 128,
    ~2 programs per SM."""
    if score == "adc":
        return {"score": score, "block_n": 128 if head_dim <= 64 else 64, "num_warps": 4, "num_stages": 1,
                "programs_per_sm": 2.0, "lut_dtype": torch.float32}
    return {"score": score, "block_n": 128, "num_warps": 4, "num_stages": 1, "programs_per_sm": 2.0}
