"""PyTorch reference for attention over a dense paged KV cache.

Cache layout (one layer): ``cache[num_blocks, num_kv_heads, block_size, 2 * head_dim]``;
row ``n`` of a head page holds ``[key_n | value_n]``, so one token's K and V sit together.

Conventions shared by every op here:
* ``slots`` are physical slot ids ``block * block_size + offset``; negative = skip.
* ``block_table[r]`` lists the physical blocks of request ``r`` in order; ``kv_lens[r]``
  is how many cached tokens request ``r`` attends to (its own new tokens included).
* Queries of a request are its last ``q_len`` tokens (bottom-right causal alignment).
Softmax and accumulation run in fp32 whatever the cache dtype (torch SDPA for
prefill, fp32 matmuls for single-token decode).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def write_rows(cache: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> None:
    """Store whole cache rows ``[T, H, row]`` at ``slots`` ``[T]``; a slot below 0 (vLLM's
    padding) stores nothing.

    No host synchronisation, so the write can sit inside a CUDA graph: padding rows are
    aimed at slot 0 and write back what is already there. Slot 0 lies in vLLM's null
    block, which never holds a request's token, so no real row of the same call lands there."""
    block_size = cache.shape[2]
    if cache.device.type == "cpu" and slots.numel() <= 16 and rows.shape[0] == slots.numel():
        # A decode step's few tokens: reading the slots back is free on the CPU, and one basic
        # index per token costs a few microseconds where the masked form below costs tens.
        rows = rows.to(cache.dtype)
        for token, slot in enumerate(slots.tolist()):
            if slot >= 0:
                cache[slot // block_size, :, slot % block_size] = rows[token]
        return
    valid = slots >= 0
    safe = torch.where(valid, slots, torch.zeros_like(slots)).long()
    blocks = torch.div(safe, block_size, rounding_mode="floor")
    offsets = safe % block_size
    # Advanced indices around a slice put the token dim first: shape [T, H, row].
    kept = cache[blocks, :, offsets]
    cache[blocks, :, offsets] = torch.where(valid.view(-1, 1, 1), rows.to(cache.dtype), kept)


def write_kv(cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
    """Store ``key``/``value`` ``[T, H, D]`` at ``slots`` ``[T]`` (see :func:`write_rows`)."""
    write_rows(cache, torch.cat([key.to(cache.dtype), value.to(cache.dtype)], -1), slots)


def gather_rows(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Cached ``[key | value]`` rows ``[B, H, length, 2D]`` of ``B`` requests, read from
    the first ``ceil(length / block_size)`` blocks of each row of ``block_table``."""
    batch, num_kv_heads, width = block_table.shape[0], cache.shape[1], cache.shape[-1]
    num_blocks = -(-length // cache.shape[2])
    # index_select, not cache[table]: the same rows, an order of magnitude faster on the CPU
    # (advanced indexing there takes a general path; benchmarks/kvquant_op).
    pages = cache.index_select(0, block_table[:, :num_blocks].flatten()).view(batch, num_blocks, *cache.shape[1:])
    return pages.permute(0, 2, 1, 3, 4).reshape(batch, num_kv_heads, -1, width)[:, :, :length]


def gather_kv(cache: torch.Tensor, blocks: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``(K, V)`` ``[H, length, D]`` of one request from its block list."""
    rows = gather_rows(cache, blocks[None], length)[0]
    head_dim = cache.shape[-1] // 2
    return rows[..., :head_dim], rows[..., head_dim:]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
           causal: bool = False) -> torch.Tensor:
    """q ``[B, Hq, Tq, D]``, k/v ``[B, Hkv, Tk, D]``, mask ``[B|1, 1, Tq, Tk]`` (True = attend).

    torch's fused SDPA keeps inputs in their dtype and accumulates in fp32 without
    materialising the score matrix; GQA is handled natively (no K/V repeat). Except on
    CUDA with a mask: no fused CUDA kernel takes both a mask and GQA, and torch's fallback
    (the math kernel) materialises ``[Hq, Tq, Tk]`` scores (tens of GB for a 16K-token chunk
    over a 32K context), so there K/V are repeated per query head for the memory-efficient
    kernel instead."""
    if mask is not None:
        k, v = _kv_for_masked(q, k, v)
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)


def _kv_for_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V as a masked :func:`attend` takes them: repeated per query head on CUDA (see there)."""
    if not q.is_cuda or q.shape[1] == k.shape[1]:
        return k, v
    group = q.shape[1] // k.shape[1]
    return k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)


# A masked attention's mask is per query head and torch's kernels turn it into floats
# ([Hq, Tq, Tk] x 4 bytes: 16 GiB for an 8K-token chunk over 16K rows at 32 heads), so the
# queries go through in tiles whose float mask stays under this many bytes.
MASK_TILE_BYTES = 1 << 30


def masked_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_rows, scale: float) -> torch.Tensor:
    """:func:`attend` with a mask built per tile of query rows: q ``[1, Hq, Tq, D]``, k/v
    ``[1, Hkv, Tk, D]``; ``mask_rows(start, end)`` is the bool mask ``[1, Hq | 1, end - start,
    Tk]`` of those queries. Each query row is attended on its own, so tiles change nothing
    but the peak memory."""
    num_q_heads, q_len, kv_len = q.shape[1], q.shape[2], k.shape[2]
    tile = max(1, MASK_TILE_BYTES // (num_q_heads * kv_len * 4))
    if tile >= q_len:
        return attend(q, k, v, mask_rows(0, q_len), scale)
    k, v = _kv_for_masked(q, k, v)  # once here, not once per tile in attend()
    return torch.cat([attend(q[:, :, start:start + tile], k, v, mask_rows(start, min(start + tile, q_len)), scale)
                      for start in range(0, q_len, tile)], dim=2)


@functools.cache
def _flash_varlen():
    """``(flash_attn_varlen_func, fa_version)`` of vLLM's FlashAttention build on this GPU, or
    None (no vLLM CUDA build here: the CPU path, the kernel tests)."""
    try:
        from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    version = get_flash_attn_version()
    return None if version is None else (flash_attn_varlen_func, version)


def bottom_right_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """``[1, 1, q_len, kv_len]``, True = attend: query ``i`` sits at position ``kv_len - q_len + i``."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device).unsqueeze(1)
    return (torch.arange(kv_len, device=device).unsqueeze(0) <= q_pos)[None, None]


def causal_attend(query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention aligned to the bottom right: the queries ``[Tq, Hq, D]`` are the last
    ``Tq`` of the ``Tk`` positions of ``k``/``v`` ``[Hkv, Tk, D]`` (a prompt, or a chunk after
    cached context). Returns ``[Tq, Hq, D]``.

    On CUDA in 16-bit, vLLM's FlashAttention (varlen; FA3 on Hopper) when its build is
    importable: the kernel FLASH_ATTN prefills with, GQA and the bottom-right mask native.
    Elsewhere torch SDPA (:func:`attend`)."""
    q_len, kv_len = query.shape[0], k.shape[1]
    flash = _flash_varlen() if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) else None
    if flash is not None:
        varlen, version = flash
        # Made on the device: a host list would be a blocking copy inside the step.
        ends = torch.arange(2, dtype=torch.int32, device=query.device)
        cu_q, cu_k = ends * q_len, ends * kv_len
        return varlen(query.contiguous(), k.transpose(0, 1).to(query.dtype).contiguous(),
                      v.transpose(0, 1).to(query.dtype).contiguous(), max_seqlen_q=q_len, cu_seqlens_q=cu_q,
                      max_seqlen_k=kv_len, cu_seqlens_k=cu_k, softmax_scale=scale, causal=True, fa_version=version)
    q = query.transpose(0, 1)[None].to(k.dtype)
    if q_len == kv_len:  # whole prompt in one step: no explicit [q_len, kv_len] mask
        out = attend(q, k[None], v[None], None, scale, causal=True)
    else:
        out = attend(q, k[None], v[None], bottom_right_mask(q_len, kv_len, q.device), scale)
    return out[0].transpose(0, 1)


def prefill_attention(
    query: torch.Tensor,
    cache: torch.Tensor,
    blocks: torch.Tensor,
    kv_len: int,
    scale: float,
    visible: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of one request's ``q_len`` new queries ``[q_len, Hq, D]``
    over its ``kv_len`` cached tokens (context + the new ones). ``visible[Hkv, kv_len]``
    (optional) hides cached rows per KV head (eviction's masked reference mode)."""
    q_len, num_q_heads = query.shape[0], query.shape[1]
    k, v = gather_kv(cache, blocks, kv_len)
    if visible is None:
        return causal_attend(query.to(k.dtype), k, v, scale)
    # Masked eviction: causal (bottom-right) and the rows each KV head still sees.
    q = query.transpose(0, 1)[None].to(k.dtype)
    group = num_q_heads // visible.shape[0]
    seen = visible.repeat_interleave(group, 0)[None, :, None, :]  # per query head: [1, Hq, 1, kv_len]
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    causal = bottom_right_mask(q_len, kv_len, q.device)  # [1, 1, q_len, kv_len] bools, made once

    def mask_rows(start: int, end: int) -> torch.Tensor:
        return causal[:, :, start:end] & seen

    return masked_attend(q, k[None], v[None], mask_rows, scale)[0].transpose(0, 1)


def decode_attention(
    query: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: float,
    visible: torch.Tensor | None = None,
    max_kv_len: int | None = None,
) -> torch.Tensor:
    """One query per request ``[B, Hq, D]``; requests padded to the longest and masked.
    ``visible[B, Hkv, >= max kv_len]`` (optional) hides rows per KV head. ``max_kv_len``:
    a host bound on ``kv_lens`` (else read back from the device, a synchronisation).

    Single-token queries use grouped fp32 matmuls rather than SDPA: on CPU, SDPA's
    per-call overhead for a query length of 1 costs ~4x more (measured)."""
    batch, num_q_heads, head_dim = query.shape
    num_kv_heads = cache.shape[1]
    max_len = int(kv_lens.max()) if max_kv_len is None else int(max_kv_len)
    rows = gather_rows(cache, block_table[:batch], max_len)
    k, v = rows[..., :head_dim].float(), rows[..., head_dim:].float()
    q = query.view(batch, num_kv_heads, num_q_heads // num_kv_heads, head_dim).float()  # GQA groups
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, Hkv, group, L]
    valid = torch.arange(max_len, device=scores.device).unsqueeze(0) < kv_lens.to(scores.device).unsqueeze(1)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    if visible is not None:
        scores = scores.masked_fill(~visible[:, :, None, :max_len], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [B, Hkv, group, D]
    return out.reshape(batch, num_q_heads, head_dim)
