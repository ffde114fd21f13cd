"""Triton kernels for LOOKAT decode: ADC lookup tables and fused paged attention over
PQ-coded keys (layout and semantics: :mod:`lookat_ref`).

Two launches (three when the context is split):

1. :func:`build_lut` — the ADC tables of every query head, premultiplied by
   ``scale * log2(e)`` so the decode kernel's logits are already in the ``exp2``
   domain. Stored **group-innermost**, ``lut[B, Hkv, m, K, GL]`` (``GL`` = the GQA group
   rounded up to a power of two, padded heads are zero): the ``group`` entries that one
   code selects for the whole GQA group are one contiguous 16/32-byte vector, so each
   (token, subspace) costs one vector gather (one L1 sector) instead of ``group`` scalar
   gathers. :func:`adc_tables` gives the ``[B, Hq, m, K]`` view of the reference.
2. ``_lookat_decode_kernel`` — one program per (request, KV head, context partition):
   codes ``[BLOCK_N, m]`` straight from the paged rows, one gather of the group's LUT
   vectors ``[BLOCK_N, m, GL]``, sum over ``m``, online softmax (fp32), values
   dequantized by folding the per-token scale into the probabilities (integers 0..15 /
   -127..127 are exact in fp16, so the tensor-core ``p @ v`` sees exact values),
   ``+ p @ min`` for 4-bit, whose low / high nibbles (even / odd columns) go through two
   ``tl.dot`` into two accumulators instead of being interleaved in registers.
3. ``_combine_kernel`` (shared with :mod:`dense_triton`) — flash-decoding reduce of the
   partitions, only when the context is split (small batch x long context).

The GQA group is widened to ``GD >= 16`` rows for ``tl.dot`` by duplicating each head's
logits (``tl.join``); duplicated rows compute the same thing and only one is stored.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from vllm_kvcompress.kernels.lookat_ref import LookatLayout

LOG2E = 1.4426950408889634
# Triton's interpreter multiplies bf16 dot operands as their raw uint16 bits (seen with
# triton 3.9); under it, dots upcast their (already rounded) operands to fp32 first.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


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
def _mma(a, b, UPCAST: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b)


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


@triton.jit
def _accumulate_values(pt, acc, acc_odd, row, slot, valid, cache_ptr, cache_i8_ptr, cache_16_ptr, cache_f16_ptr,
                       M: tl.constexpr, D: tl.constexpr, ROW_BYTES: tl.constexpr, VALUE_BITS: tl.constexpr,
                       INTERP: tl.constexpr):
    """``acc (+ acc_odd) += pt @ values`` for probabilities ``pt[GD, N]`` (fp32) of the tile's rows."""
    if VALUE_BITS == 16:
        d = tl.arange(0, D)
        v = tl.load(cache_16_ptr + (slot * (ROW_BYTES // 2) + M // 2)[:, None] + d[None, :],
                    mask=valid[:, None], other=0.0)  # [N, D] bf16 / fp16
        acc += _mma(pt.to(v.dtype), v, INTERP)
    elif VALUE_BITS == 8:
        d = tl.arange(0, D)
        q = tl.load(cache_i8_ptr + (row + M)[:, None] + d[None, :], mask=valid[:, None], other=0)
        sc = tl.load(cache_f16_ptr + slot * (ROW_BYTES // 2) + (M + D) // 2, mask=valid, other=0.0)
        acc += _mma((pt * sc.to(tl.float32)[None, :]).to(tl.float16), q.to(tl.float16), INTERP)
    else:
        j = tl.arange(0, D // 2)
        x = tl.load(cache_ptr + (row + M)[:, None] + j[None, :], mask=valid[:, None], other=0)  # [N, D/2]
        prm = slot * (ROW_BYTES // 2) + (M + D // 2) // 2
        sc = tl.load(cache_f16_ptr + prm, mask=valid, other=0.0).to(tl.float32)
        lo = tl.load(cache_f16_ptr + prm + 1, mask=valid, other=0.0).to(tl.float32)
        ps = (pt * sc[None, :]).to(tl.float16)
        shift = tl.sum(pt * lo[None, :], axis=1)[:, None]  # sum_n p_n * min_n
        acc += _mma(ps, (x & 15).to(tl.float16), INTERP) + shift  # element 2j: low nibble
        acc_odd += _mma(ps, (x >> 4).to(tl.float16), INTERP) + shift
    return acc, acc_odd


@triton.jit
def _lookat_decode_kernel(
        lut_ptr, cache_ptr, cache_i8_ptr, cache_16_ptr, cache_f16_ptr, bt_ptr, lens_ptr, stride_bt, num_kv_heads,
        q_ptr, stride_qb, stride_qh, qk_scale,
        out_ptr, ml_ptr, num_q_heads, num_splits, part_len,
        G: tl.constexpr, GL: tl.constexpr, GD: tl.constexpr, PAD_LOG: tl.constexpr,
        M: tl.constexpr, K: tl.constexpr, D: tl.constexpr,
        ROW_BYTES: tl.constexpr, ALIGN: tl.constexpr, BS: tl.constexpr, VALUE_BITS: tl.constexpr,
        SCORE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, INTERP: tl.constexpr):
    """SCORE 0: ADC, one [N, M, GL] gather summed over M; 2: keys rebuilt from the codebooks
    (``lut_ptr`` = codebooks ``[Hkv, M, K, D/M]`` in bf16) and ``q @ k`` on tensor cores,
    codes read once per key dimension ([N, D] bytes); 3: the same with codes read once
    ([N, M]), centroids gathered as [N, M, D/M] and reshaped to [N, D].
    (A SCORE 1, one [N, GL] gather per subspace in a static loop, was right under the
    interpreter but wrong on the H100 with Triton 3.6, and was dropped.)"""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // num_kv_heads
    h = bh % num_kv_heads
    kv_len = tl.load(lens_ptr + b)
    start = split * part_len
    end = tl.minimum(start + part_len, kv_len)

    offs_n = tl.arange(0, BLOCK_N)
    offs_i = tl.arange(0, M)
    offs_g = tl.arange(0, GL)
    offs_d = tl.arange(0, D)
    SUB: tl.constexpr = D // M
    if SCORE >= 2:
        r = tl.arange(0, GD)
        qv = tl.load(q_ptr + b * stride_qb + (h * G + r)[:, None] * stride_qh + offs_d[None, :],
                     mask=(r < G)[:, None], other=0.0).to(lut_ptr.dtype.element_ty)  # [GD, D]
        cb_base = lut_ptr + h * (M * K * SUB)
        cb_offs = ((offs_d // SUB) * (K * SUB) + offs_d % SUB)[None, :]  # [1, D]
        cb_offs3 = (offs_i * (K * SUB))[None, :, None] + tl.arange(0, SUB)[None, None, :]  # [1, M, SUB]
    else:
        lut_base = lut_ptr + bh.to(tl.int64) * (M * K * GL)
        lut_offs = (offs_i * (K * GL))[None, :, None] + offs_g[None, None, :]  # [1, M, GL]

    m_i = tl.full([GD], float("-inf"), tl.float32)
    l_i = tl.zeros([GD], tl.float32)
    if VALUE_BITS == 4:  # even / odd columns (low / high nibbles) in two accumulators
        acc = tl.zeros([GD, D // 2], tl.float32)
        acc_odd = tl.zeros([GD, D // 2], tl.float32)
    else:
        acc = tl.zeros([GD, D], tl.float32)
        acc_odd = tl.zeros([GD, 1], tl.float32)  # unused
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        valid = pos < end
        page = tl.load(bt_ptr + b * stride_bt + pos // BS, mask=valid, other=0).to(tl.int64)
        slot = (page * num_kv_heads + h) * BS + pos % BS  # row index, int64
        # Alignment hints: every row starts at a multiple of ALIGN bytes (the largest power of
        # two dividing ROW_BYTES) and no more (without them Triton 3.6 assumed more for
        # 8-bit rows and issued misaligned 4-byte copies).
        row = tl.multiple_of(slot * ROW_BYTES, ALIGN)
        if SCORE == 0:
            codes = tl.load(cache_ptr + row[:, None] + offs_i[None, :], mask=valid[:, None], other=0)  # [N, M]
            lidx = lut_offs + (codes.to(tl.int32) * GL)[:, :, None]  # [N, M, GL]: one vector per (token, i)
            lidx = tl.max_contiguous(tl.multiple_of(lidx, [1, 1, GL]), [1, 1, GL])
            t = tl.load(lut_base + lidx, cache_modifier=".ca")
            s = tl.trans(_widen(tl.sum(t.to(tl.float32), axis=1), BLOCK_N, GL, PAD_LOG))  # [GD, N], log2 domain
        elif SCORE == 2:
            c = tl.load(cache_ptr + row[:, None] + (offs_d // SUB)[None, :], mask=valid[:, None], other=0)  # [N, D]
            kidx = cb_offs + c.to(tl.int32) * SUB
            kidx = tl.max_contiguous(tl.multiple_of(kidx, [1, SUB]), [1, SUB])
            k = tl.load(cb_base + kidx, cache_modifier=".ca")  # [N, D] rebuilt keys
            s = _mma(qv, tl.trans(k), INTERP) * qk_scale  # [GD, N], log2 domain
        else:
            codes = tl.load(cache_ptr + row[:, None] + offs_i[None, :], mask=valid[:, None], other=0)  # [N, M]
            kidx = cb_offs3 + (codes.to(tl.int32) * SUB)[:, :, None]  # [N, M, SUB]: one centroid per (token, i)
            kidx = tl.max_contiguous(tl.multiple_of(kidx, [1, 1, SUB]), [1, 1, SUB])
            k = tl.reshape(tl.load(cb_base + kidx, cache_modifier=".ca"), [BLOCK_N, D])
            s = _mma(qv, tl.trans(k), INTERP) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # [GD, N]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        if VALUE_BITS == 4:
            acc_odd = acc_odd * alpha[:, None]
        acc, acc_odd = _accumulate_values(p, acc, acc_odd, row, slot, valid, cache_ptr, cache_i8_ptr, cache_16_ptr,
                                          cache_f16_ptr, M, D, ROW_BYTES, VALUE_BITS, INTERP)
        m_i = m_new
    _store_partial(acc, acc_odd, m_i, l_i, out_ptr, ml_ptr, b, h, split, num_q_heads, num_splits,
                   G, GD, PAD_LOG, D, SPLIT, VALUE_BITS == 4)


@triton.jit
def _combine_kernel(part_ptr, ml_ptr, lens_ptr, out_ptr, num_q_heads, num_splits, part_len,
                    SP: tl.constexpr, D: tl.constexpr):
    """out[b, h] = sum_s 2^(lse_s - lse) o_s over the partitions that hold tokens."""
    row = tl.program_id(0)  # b * Hq + h
    b = row // num_q_heads
    n_valid = tl.cdiv(tl.load(lens_ptr + b), part_len)
    s = tl.arange(0, SP)
    d = tl.arange(0, D)
    keep = s < n_valid
    base = row.to(tl.int64) * num_splits
    lse = tl.load(ml_ptr + base + s, mask=keep, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, axis=0))
    w = tl.where(keep, w, 0.0)
    o = tl.load(part_ptr + (base + s)[:, None] * D + d[None, :], mask=keep[:, None], other=0.0)
    out = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + row.to(tl.int64) * D + d, out.to(out_ptr.dtype.element_ty))


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan_splits(batch: int, num_kv_heads: int, max_len: int, block_n: int, sms: int,
                programs_per_sm: float = 2.0, min_part: int = 256) -> tuple[int, int]:
    """``(num_splits, part_len)``: enough programs to fill the GPU, each at least
    ``min_part`` tokens (a multiple of ``block_n``)."""
    want = max(1, math.ceil(programs_per_sm * sms / (batch * num_kv_heads)))
    splits = max(1, min(want, max_len // max(min_part, block_n)))
    part = triton.cdiv(triton.cdiv(max_len, splits), block_n) * block_n
    return triton.cdiv(max_len, part), part


def combine(partial: torch.Tensor, lse: torch.Tensor, kv_lens: torch.Tensor, part_len: int,
            out: torch.Tensor) -> torch.Tensor:
    batch, num_q_heads, num_splits, head_dim = partial.shape
    _combine_kernel[(batch * num_q_heads,)](partial, lse, kv_lens, out, num_q_heads, num_splits, part_len,
                                            SP=_next_pow2(num_splits), D=head_dim, num_warps=4)
    return out


def launch_split(kernel, grid_bh: int, args: tuple, consts: dict, query: torch.Tensor, kv_lens: torch.Tensor,
                 num_splits: int, part_len: int, out_dtype: torch.dtype, num_warps: int,
                 num_stages: int | None) -> torch.Tensor:
    """Run ``kernel`` over ``(grid_bh, num_splits)`` programs; combine when split."""
    batch, num_q_heads, head_dim = query.shape
    out = torch.empty(batch, num_q_heads, head_dim, dtype=out_dtype, device=query.device)
    extra = {} if num_stages is None else {"num_stages": num_stages}
    if num_splits == 1:
        kernel[(grid_bh, 1)](*args, out, out, num_q_heads, 1, part_len, **consts, SPLIT=False, INTERP=INTERPRET,
                             num_warps=num_warps, **extra)
        return out
    partial = torch.empty(batch, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=query.device)
    lse = torch.empty(batch, num_q_heads, num_splits, dtype=torch.float32, device=query.device)
    kernel[(grid_bh, num_splits)](*args, partial, lse, num_q_heads, num_splits, part_len, **consts, SPLIT=True,
                                  INTERP=INTERPRET,
                                  num_warps=num_warps, **extra)
    return combine(partial, lse, kv_lens, part_len, out)


DEFAULTS = {"score": "adc", "block_n": 128, "num_warps": 4, "num_stages": 1, "programs_per_sm": 2.0,
            "min_part": 256, "lut_dtype": torch.float32}
SCORES = {"adc": 0, "rebuilt": 2, "rebuilt_v": 3}


def lookat_decode(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, kv_lens: torch.Tensor,
                  codebooks: torch.Tensor, layout: LookatLayout, scale: float, dims: torch.Tensor | None = None,
                  *, max_kv_len: int | None = None, out_dtype: torch.dtype = torch.float32,
                  num_splits: int | None = None, lut: torch.Tensor | None = None, **tune) -> torch.Tensor:
    """Same as ``lookat_ref.decode_attention(..., current=None)``: ``[B, Hq, D]``.

    ``max_kv_len``: host copy of ``kv_lens.max()`` (else read back, a device sync).
    ``num_splits``: force the number of context partitions (else :func:`plan_splits`).
    ``tune``: overrides of :data:`DEFAULTS`: ``score`` ("adc": ADC tables, one gather of
    ``[N, m, GL]`` vectors per tile; "rebuilt": no tables, keys rebuilt from bf16 codebooks
    in registers and scored on tensor cores; "rebuilt_v": the same, codes loaded once per
    token and centroid vectors reshaped to keys),
    block_n, num_warps, num_stages, programs_per_sm, min_part, lut_dtype. ``lut``: a
    prebuilt :func:`build_lut` (``mult = scale * log2(e)``), or for "rebuilt" the
    codebooks already in bf16, to leave the conversion out of a timed call.
    """
    cfg = {**DEFAULTS, **tune}
    score = SCORES[cfg["score"]]
    batch, num_q_heads, head_dim = query.shape
    num_kv_heads, m, num_codes, _ = codebooks.shape
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
    if score >= 2:
        if lut is None:
            lut = codebooks.to(torch.bfloat16).contiguous()
        pad_log = 0  # rows of the group are the query heads themselves
    elif lut is None:
        lut = build_lut(query, codebooks, scale * LOG2E, cfg["lut_dtype"])
    max_len = int(kv_lens.max()) if max_kv_len is None else int(max_kv_len)
    block_n = cfg["block_n"]
    if num_splits is None:
        num_splits, part_len = plan_splits(batch, num_kv_heads, max_len, block_n, num_sms(query.device),
                                           cfg["programs_per_sm"], cfg["min_part"])
    else:
        part_len = triton.cdiv(triton.cdiv(max_len, num_splits), block_n) * block_n
        num_splits = triton.cdiv(max_len, part_len)
    value_16 = layout.value_dtype if layout.value_bits == 16 else torch.float16
    args = (lut, cache, cache.view(torch.int8), cache.view(value_16), cache.view(torch.float16),
            block_table, kv_lens, block_table.stride(0), num_kv_heads,
            query, query.stride(0), query.stride(1), float(scale * LOG2E))
    consts = dict(G=group, GL=gl, GD=gd, PAD_LOG=pad_log, M=m, K=num_codes, D=head_dim,
                  ROW_BYTES=layout.row_bytes, ALIGN=layout.row_bytes & -layout.row_bytes, BS=cache.shape[2],
                  VALUE_BITS=layout.value_bits, SCORE=score, BLOCK_N=block_n)
    return launch_split(_lookat_decode_kernel, batch * num_kv_heads, args, consts, query, kv_lens, num_splits,
                        part_len, out_dtype, cfg["num_warps"], cfg["num_stages"])


def tuned(head_dim: int, m: int, value_bits: int, batch: int, score: str = "adc") -> dict:
    """Launch parameters, from ``benchmarks.kernels_lookat --sweep`` on an H100 (Triton 3.6):
    128-token tiles, 4 warps, no software pipelining (``num_stages=1``: with stages, Triton
    copies the table gathers with ``cp.async.cg``, which skips L1, where the tables live),
    about 2 programs per SM; fp32 tables for m=8, fp16 above (they stay in L1)."""
    cfg = {"score": score, "block_n": 128, "num_warps": 4, "num_stages": 1, "programs_per_sm": 2.0}
    if score == "adc":
        cfg["lut_dtype"] = torch.float32 if m <= 8 else torch.float16
    return cfg
