"""PyTorch reference for attention over a paged cache of KVQuant-style keys: each key
turned back by RoPE to position 0, stored as static per-channel integers (8 or 4 bits;
one (minimum, step) per layer, KV head and channel, calibrated offline), and turned
forward again to its position when read. Values as in :mod:`lookat_ref` (16/8/4 bits).

Page layout (one layer): ``cache[num_blocks, num_kv_heads, block_size, row_bytes]`` uint8,
one row per (token, KV head)::

    [ key codes: D * bits / 8 bytes | value payload | value params ]

the row layout of :class:`lookat_ref.LookatLayout` with ``m`` = the key bytes (8 bits: one
byte per channel; 4 bits: channel ``2j`` in the low nibble of byte ``j``), plus, for a cache
that evicts (``layout(..., positions=True)``), the token's logical position as 4 bytes
(int32) after the key codes.

Why before RoPE: RoPE turns each channel pair by an angle that grows with position, so a
channel's range after RoPE is the whole circle of its pair (a large constant k_proj bias
becomes a large swing); before RoPE each channel keeps a narrow, position-free range, and a
static range per channel needs no scale stored per token. Without eviction a row's position
is its index in the request's rows; once eviction compacts rows, that index is physical and
RoPE needs the logical position, so an evicting cache stores it in the row.
"""

from __future__ import annotations

import torch

from vllm_kvcompress.kernels import paged_dense_ref
from vllm_kvcompress.kernels.lookat_ref import LookatLayout, dequantize_values, quantize_values
from vllm_kvcompress.kernels.paged_dense_ref import gather_rows
from vllm_kvcompress.kernels.rope_ref import rotate

KEY_BITS = (8, 4)
POSITION_BYTES = 4


def layout(head_dim: int, key_bits: int, value_bits: int, value_dtype: torch.dtype,
           positions: bool = False) -> LookatLayout:
    """``positions``: rows carry their logical position (an evicting cache)."""
    if key_bits not in KEY_BITS:
        raise ValueError(f"key_bits must be one of {KEY_BITS}, got {key_bits}")
    return LookatLayout(head_dim=head_dim, m=_key_bytes(head_dim, key_bits) + (POSITION_BYTES if positions else 0),
                        value_bits=value_bits, value_dtype=value_dtype, pq=False)


def _key_bytes(head_dim: int, key_bits: int) -> int:
    return head_dim * key_bits // 8


def _positions(data: torch.Tensor, rows: LookatLayout, key_bits: int, length: int) -> torch.Tensor:
    """Each row's logical position ``[..., L]``: stored after the key codes, or its index."""
    start = _key_bytes(rows.head_dim, key_bits)
    if rows.m == start:
        return torch.arange(length, device=data.device)
    return data[..., start : start + POSITION_BYTES].contiguous().view(torch.int32)[..., 0].long()


def key_steps(ranges: torch.Tensor, key_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``ranges[Hkv, 2, D]`` (minimum, maximum of the pre-RoPE keys) -> (minimum, step), fp32."""
    low, high = ranges[:, 0].float(), ranges[:, 1].float()
    step = (high - low) / (2 ** key_bits - 1)
    return low, torch.where(step > 0, step, torch.ones_like(step))


def quantize_keys(key: torch.Tensor, positions: torch.Tensor, ranges: torch.Tensor, key_bits: int,
                  theta: float) -> torch.Tensor:
    """Keys ``[T, Hkv, D]`` (post-RoPE, token t at ``positions[t]``) -> codes ``[T, Hkv, D * bits / 8]``
    uint8. Values outside the calibrated range are clamped to it."""
    base = rotate(key.transpose(0, 1), positions, theta, nonnegative=True, back=True).transpose(0, 1)  # position 0
    return key_codes(base, ranges, key_bits)


def key_codes(base: torch.Tensor, ranges: torch.Tensor, key_bits: int) -> torch.Tensor:
    """Pre-RoPE keys ``[T, Hkv, D]`` -> their codes ``[T, Hkv, D * bits / 8]`` uint8 (clamped to
    the range; 4 bits: channel ``2j`` in the low nibble of byte ``j``)."""
    low, step = key_steps(ranges, key_bits)
    q = torch.round((base - low) / step).clamp_(0, 2 ** key_bits - 1).to(torch.uint8)
    return q if key_bits == 8 else q[..., 0::2] | (q[..., 1::2] << 4)


def dequantize_keys(codes: torch.Tensor, positions: torch.Tensor, ranges: torch.Tensor, key_bits: int,
                    theta: float) -> torch.Tensor:
    """Codes ``[..., Hkv, L, D * bits / 8]`` -> keys ``[..., Hkv, L, D]`` fp32 at ``positions[L]``."""
    return rotate(key_base(codes, ranges, key_bits), positions, theta, nonnegative=True)


def key_base(codes: torch.Tensor, ranges: torch.Tensor, key_bits: int) -> torch.Tensor:
    """Codes ``[..., Hkv, L, D * bits / 8]`` -> the pre-RoPE keys ``[..., Hkv, L, D]`` fp32."""
    if key_bits == 4:
        codes = torch.stack([codes & 15, codes >> 4], -1).flatten(-2)
    low, step = key_steps(ranges, key_bits)
    return torch.addcmul(low[:, None, :], codes.float(), step[:, None, :])


def encode_rows(key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor, ranges: torch.Tensor,
                key_bits: int, theta: float, rows: LookatLayout) -> torch.Tensor:
    """Cache rows ``[T, Hkv, row_bytes]`` for keys/values ``[T, Hkv, D]``."""
    parts = [quantize_keys(key, positions, ranges, key_bits, theta)]
    if rows.m > _key_bytes(rows.head_dim, key_bits):
        stored = positions.to(torch.int32).contiguous().view(torch.uint8).view(-1, 1, POSITION_BYTES)
        parts.append(stored.expand(-1, key.shape[1], -1))
    return torch.cat([*parts, quantize_values(value, rows)], -1)


def decode_rows(data: torch.Tensor, ranges: torch.Tensor, key_bits: int, theta: float,
                rows: LookatLayout) -> torch.Tensor:
    """Rows ``[..., Hkv, L, row_bytes]`` that store their positions (an evicting cache) ->
    ``[..., Hkv, L, 2D]`` ``[key | value]`` fp32, each key at its stored position: what a
    stream attention gathers from a pool of kvquant rows."""
    key_bytes = _key_bytes(rows.head_dim, key_bits)
    if rows.m == key_bytes:
        raise ValueError("kvquant rows gathered out of order must store their positions (layout(positions=True))")
    positions = _positions(data, rows, key_bits, data.shape[-2])
    keys = dequantize_keys(data[..., :key_bytes], positions, ranges, key_bits, theta)
    return torch.cat([keys, dequantize_values(data[..., rows.m :], rows)], -1)


def read_rows(cache: torch.Tensor, blocks: torch.Tensor, length: int, ranges: torch.Tensor, key_bits: int,
              theta: float, rows: LookatLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """One request's first ``length`` rows: keys and values ``[Hkv, length, D]`` fp32."""
    data = gather_rows(cache, blocks[None], length)[0]
    positions = _positions(data, rows, key_bits, length)
    keys = dequantize_keys(data[..., : _key_bytes(rows.head_dim, key_bits)], positions, ranges, key_bits, theta)
    return keys, dequantize_values(data[..., rows.m :], rows)


def decode_attention(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, kv_lens: torch.Tensor,
                     ranges: torch.Tensor, key_bits: int, theta: float, rows: LookatLayout, scale: float,
                     max_kv_len: int | None = None) -> torch.Tensor:
    """One query per request ``[B, Hq, D]`` over its ``kv_lens`` rows (its new token
    included, read back from the cache)."""
    batch, num_q_heads, head_dim = query.shape
    max_len = int(kv_lens.max()) if max_kv_len is None else int(max_kv_len)
    data = gather_rows(cache, block_table[:batch], max_len)  # [B, Hkv, L, row_bytes]
    num_kv_heads = data.shape[1]
    positions = _positions(data, rows, key_bits, max_len)
    keys = dequantize_keys(data[..., : _key_bytes(rows.head_dim, key_bits)], positions, ranges, key_bits,
                           theta)  # [B, Hkv, L, D]
    values = dequantize_values(data[..., rows.m :], rows)
    group = num_q_heads // num_kv_heads
    q = query.float().view(batch, num_kv_heads, group, head_dim)
    logits = (q * scale) @ keys.transpose(-1, -2)  # [B, Hkv, g, L]
    # No mask where every request has ``max_len`` rows (batch 1); reading that back is free on the CPU only.
    if cache.device.type != "cpu" or int(kv_lens.min()) < max_len:
        valid = torch.arange(max_len, device=cache.device).unsqueeze(0) < kv_lens.to(cache.device).unsqueeze(1)
        logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.matmul(torch.softmax(logits, -1), values)  # [B, Hkv, g, D]
    return out.reshape(batch, num_q_heads, head_dim)


def prefill_attention(query: torch.Tensor, cache: torch.Tensor, blocks: torch.Tensor, kv_len: int,
                      ranges: torch.Tensor, key_bits: int, theta: float, rows: LookatLayout,
                      scale: float) -> torch.Tensor:
    """Causal attention of one request's ``q_len`` new queries ``[q_len, Hq, D]`` over its
    ``kv_len`` rows (the new ones included, read back)."""
    keys, values = read_rows(cache, blocks, kv_len, ranges, key_bits, theta, rows)
    return paged_dense_ref.causal_attend(query, keys.to(query.dtype), values.to(query.dtype), scale)
