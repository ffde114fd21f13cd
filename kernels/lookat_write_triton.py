"""Triton kernel for the LOOKAT cache write: PQ-encode the step's keys, quantize its values
and store the rows at their slots, in one launch per layer (reference:
:func:`lookat_ref.encode_write`, i.e. ``encode_rows`` then ``write_rows``).

Why a kernel: the PyTorch ops take ~30 small launches per layer (permute, distances,
argmin, min/max, round, pack, where, scatter...). At decode each is a few microseconds of
nothing, and at 32 layers they cost milliseconds per step, inside the CUDA graph or not.

Grid ``(ceil(T / BLOCK_T), Hkv, m + 1)``: program ``(tile, h, i < m)`` codes subspace ``i``
of the tile's keys (distances ``|c|^2 - 2 x.c`` to the ``K`` centroids, first minimum, as
the reference's argmin); program ``(tile, h, m)`` quantizes the tile's values. Splitting
the subspaces over programs keeps a decode step of a few tokens spread over the SMs.
Padding slots (< 0) store nothing. Rounding is the reference's: fp32 distances (summed in
another order, so a code may differ where two centroids are within rounding of each other),
IEEE division and round-half-to-even for the value integers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_kvcompress.kernels.lookat_ref import LookatLayout

BLOCK_T = 16


@triton.jit
def _round_half_even(x):
    f = tl.floor(x)
    d = x - f
    odd = (f.to(tl.int32) & 1) == 1
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _lookat_write_kernel(key_ptr, value_ptr, slots_ptr, cb_ptr, dims_ptr,
                         cache_ptr, cache_i8_ptr, cache_16_ptr, cache_f16_ptr,
                         num_tokens, num_kv_heads, stride_kt, stride_kh, stride_vt, stride_vh,
                         M: tl.constexpr, K: tl.constexpr, D: tl.constexpr, SUB: tl.constexpr, SUBP: tl.constexpr,
                         ROW_BYTES: tl.constexpr, BS: tl.constexpr, VALUE_BITS: tl.constexpr,
                         HAS_DIMS: tl.constexpr, BLOCK_T: tl.constexpr, MMA: tl.constexpr):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    i = tl.program_id(2)
    t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    slot = tl.load(slots_ptr + t, mask=t < num_tokens, other=-1).to(tl.int64)
    live = slot >= 0
    safe = tl.where(live, slot, 0)
    row = ((safe // BS) * num_kv_heads + h) * BS + safe % BS  # row index in the cache, int64
    if i < M:
        k = tl.arange(0, K)
        if MMA:
            # Dot products on tensor cores in tf32: keys (bf16 / fp16) and centroids (bf16
            # values, LookatFormat) are exact in tf32, so every product is exact and only the
            # order of the fp32 sums differs.
            s = tl.arange(0, SUBP)
            if HAS_DIMS:
                dim = tl.load(dims_ptr + i * SUB + s, mask=s < SUB, other=0)
            else:
                dim = i * SUB + s
            x = tl.load(key_ptr + t[:, None] * stride_kt + h * stride_kh + dim[None, :],
                        mask=live[:, None] & (s < SUB)[None, :], other=0.0).to(tl.float32)  # [BLOCK_T, SUBP]
            c = tl.load(cb_ptr + ((h * M + i) * K + k)[None, :] * SUB + s[:, None], mask=(s < SUB)[:, None],
                        other=0.0)  # [SUBP, K]
            dist = tl.sum(c * c, axis=0)[None, :] - 2.0 * tl.dot(x, c, input_precision="tf32")
        else:
            # Distances to every centroid of subspace i, one key dimension at a time: [BLOCK_T, K].
            cb = cb_ptr + ((h * M + i) * K + k) * SUB  # centroid k of subspace i, first dimension
            dot = tl.zeros([BLOCK_T, K], tl.float32)
            norm = tl.zeros([K], tl.float32)
            for s in tl.static_range(SUB):
                if HAS_DIMS:
                    dim = tl.load(dims_ptr + i * SUB + s)
                else:
                    dim = i * SUB + s
                x = tl.load(key_ptr + t * stride_kt + h * stride_kh + dim, mask=live, other=0.0).to(tl.float32)
                c = tl.load(cb + s)
                dot += x[:, None] * c[None, :]
                norm += c * c
            dist = norm[None, :] - 2.0 * dot
        code = tl.argmin(dist, axis=1, tie_break_left=True)
        tl.store(cache_ptr + row * ROW_BYTES + i, code.to(tl.uint8), mask=live)
    else:
        if VALUE_BITS == 16:
            d = tl.arange(0, D)
            v = tl.load(value_ptr + t[:, None] * stride_vt + h * stride_vh + d[None, :], mask=live[:, None], other=0.0)
            tl.store(cache_16_ptr + (row * (ROW_BYTES // 2) + M // 2)[:, None] + d[None, :],
                     v.to(cache_16_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=live[:, None])
        elif VALUE_BITS == 8:
            d = tl.arange(0, D)
            v = tl.load(value_ptr + t[:, None] * stride_vt + h * stride_vh + d[None, :], mask=live[:, None],
                        other=0.0).to(tl.float32)
            scale = tl.maximum(tl.div_rn(tl.max(tl.abs(v), axis=1), 127.0), 1e-7).to(tl.float16).to(tl.float32)
            q = _round_half_even(tl.div_rn(v, scale[:, None]))
            q = tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8)
            tl.store(cache_i8_ptr + (row * ROW_BYTES + M)[:, None] + d[None, :], q, mask=live[:, None])
            tl.store(cache_f16_ptr + row * (ROW_BYTES // 2) + (M + D) // 2, scale.to(tl.float16), mask=live)
        else:
            j = tl.arange(0, D // 2)
            base = value_ptr + t[:, None] * stride_vt + h * stride_vh + 2 * j[None, :]
            even = tl.load(base, mask=live[:, None], other=0.0).to(tl.float32)
            odd = tl.load(base + 1, mask=live[:, None], other=0.0).to(tl.float32)
            low = tl.minimum(tl.min(even, axis=1), tl.min(odd, axis=1))
            high = tl.maximum(tl.max(even, axis=1), tl.max(odd, axis=1))
            scale = tl.maximum(tl.div_rn(high - low, 15.0), 1e-7).to(tl.float16)
            low = low.to(tl.float16)
            sf = scale.to(tl.float32)[:, None]
            lf = low.to(tl.float32)[:, None]
            q_even = tl.minimum(tl.maximum(_round_half_even(tl.div_rn(even - lf, sf)), 0.0), 15.0).to(tl.uint8)
            q_odd = tl.minimum(tl.maximum(_round_half_even(tl.div_rn(odd - lf, sf)), 0.0), 15.0).to(tl.uint8)
            tl.store(cache_ptr + (row * ROW_BYTES + M)[:, None] + j[None, :], q_even | (q_odd << 4),
                     mask=live[:, None])
            prm = row * (ROW_BYTES // 2) + (M + D // 2) // 2
            tl.store(cache_f16_ptr + prm, scale, mask=live)
            tl.store(cache_f16_ptr + prm + 1, low, mask=live)


def lookat_write(cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor,
                 codebooks: torch.Tensor, dims: torch.Tensor | None, layout: LookatLayout, *,
                 distances: str | None = None, block_t: int | None = None) -> None:
    """Same as ``lookat_ref.encode_write``: rows of ``key`` / ``value`` ``[T, Hkv, D]`` at
    ``slots`` ``[T]`` of ``cache[num_blocks, Hkv, block_size, row_bytes]``. ``codebooks``:
    fp32 ``[Hkv, m, K, D/m]`` on the cache's device. ``distances``: "mma" (tensor cores in
    tf32: exact for bf16/fp16 keys and bf16-valued centroids, so the default for those key
    dtypes) or "fma" (fp32 on the CUDA cores: the default for fp32 keys). ``block_t``: tokens
    per program (a power of two, at least 16 for "mma"); by default 16 up to 256 tokens, else
    64. Defaults from ``benchmarks.kernels_lookat_write`` on the H200
    (results/2026-12-03/h200-eviction-1/write_kernel.md): "mma" is as fast at one token and
    3.3x faster for an 8K-token prefill chunk."""
    if distances is None:
        distances = "mma" if key.dtype in (torch.bfloat16, torch.float16) else "fma"
    if distances not in ("fma", "mma"):
        raise ValueError(f"distances must be 'fma' or 'mma', got {distances!r}")
    num_tokens, num_kv_heads, head_dim = key.shape
    if not num_tokens:
        return
    if block_t is None:
        block_t = 16 if num_tokens <= 256 else 64
    m, num_codes, sub = codebooks.shape[1], codebooks.shape[2], codebooks.shape[3]
    value = value if value.stride(-1) == 1 else value.contiguous()
    codebooks = codebooks if codebooks.dtype == torch.float32 and codebooks.is_contiguous() else \
        codebooks.float().contiguous()
    value_16 = layout.value_dtype if layout.value_bits == 16 else torch.float16
    grid = (triton.cdiv(num_tokens, block_t), num_kv_heads, m + 1)
    _lookat_write_kernel[grid](
        key, value, slots, codebooks, codebooks if dims is None else dims.flatten(),
        cache, cache.view(torch.int8), cache.view(value_16), cache.view(torch.float16),
        num_tokens, num_kv_heads, key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        M=m, K=num_codes, D=head_dim, SUB=sub, SUBP=max(16, sub), ROW_BYTES=layout.row_bytes, BS=cache.shape[2],
        VALUE_BITS=layout.value_bits, HAS_DIMS=dims is not None, BLOCK_T=block_t, MMA=distances == "mma",
        num_warps=4)
