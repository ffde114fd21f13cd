"""PyTorch reference for LOOKAT attention over a paged cache of PQ-coded keys.

Page layout (one layer): ``cache[num_blocks, num_kv_heads, block_size, row_bytes]`` uint8.
Each row is one token of one KV head::

    [ codes: m x uint8 | value payload | value params ]

* codes: nearest-centroid index per key subspace (see :mod:`pq_ref`).
* value payload / params, by ``value_bits``:
  - 16: the value in a 2-byte float (``value_dtype``: bf16 or fp16), ``2 * D`` bytes; no params.
  - 8: int8, symmetric per (token, head): ``D`` bytes; params = fp16 scale (2 bytes).
  - 4: uint4, asymmetric per (token, head), two per byte (element ``2j`` in the low
    nibble): ``D / 2`` bytes; params = fp16 scale, fp16 minimum (4 bytes).

Subspaces need not be contiguous: ``dims[m, s]`` lists the key dimensions of each
subspace (calibration chooses; e.g. RoPE pairs kept together). Keys and queries are
permuted by ``dims.flatten()`` before :mod:`pq_ref`'s contiguous split, so every op
below works on permuted vectors.

Attention:
* decode (one query per request): ADC — per-query-head lookup tables over the
  group's codes, never rebuilding keys.
* prefill (many queries per request): logits from keys rebuilt out of the codebooks,
  identical to ADC up to float summation order; a per-query table costs ``K * D``
  multiply-adds per query head, more than direct dot products over a prompt chunk.
* ``current``: optional exact ``(key, value)`` of the step's own tokens. When given,
  those tokens are attended exactly (as they are still in registers); without it
  every token, the step's own included, is read back from the coded cache, which
  makes outputs independent of chunking and prefix caching.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvcompress.kernels import paged_dense_ref, pq_ref
from vllm_kvcompress.kernels.paged_dense_ref import gather_rows

VALUE_BITS = (16, 8, 4)


@dataclass(frozen=True)
class LookatLayout:
    head_dim: int
    m: int
    value_bits: int = 16
    value_dtype: torch.dtype = torch.bfloat16  # the 16-bit value format
    # m counts PQ subspaces (one code byte each); False: m is only the key part's bytes
    # (kvquant's integer keys, and the position an evicting kvquant row carries).
    pq: bool = True

    def __post_init__(self):
        if self.value_bits not in VALUE_BITS:
            raise ValueError(f"value_bits must be one of {VALUE_BITS}, got {self.value_bits}")
        if self.m % 2 or (self.pq and self.head_dim % self.m):
            raise ValueError(f"m={self.m} must be even and divide head_dim {self.head_dim}")

    @property
    def value_bytes(self) -> int:
        return self.head_dim * self.value_bits // 8

    @property
    def param_bytes(self) -> int:
        return {16: 0, 8: 2, 4: 4}[self.value_bits]

    @property
    def row_bytes(self) -> int:
        return self.m + self.value_bytes + self.param_bytes

    @property
    def dense_row_bytes(self) -> int:
        return 4 * self.head_dim  # bf16 key + bf16 value


def _as_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.uint8)


def quantize_values(value: torch.Tensor, layout: LookatLayout) -> torch.Tensor:
    """``value[..., D]`` -> payload and params ``[..., value_bytes + param_bytes]`` uint8."""
    lead = value.shape[:-1]
    if layout.value_bits == 16:
        return _as_bytes(value.to(layout.value_dtype)).view(*lead, -1)
    v = value.float()
    if layout.value_bits == 8:
        scale = (v.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-7).half()
        q = torch.round(v / scale.float()).clamp(-127, 127).to(torch.int8)
        return torch.cat([_as_bytes(q), _as_bytes(scale)], -1)
    low, high = v.amin(-1, keepdim=True), v.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp_min(1e-7).half()
    low = low.half()
    q = torch.round((v - low.float()) / scale.float()).clamp(0, 15).to(torch.uint8)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    return torch.cat([packed, _as_bytes(scale), _as_bytes(low)], -1)


def dequantize_values(data: torch.Tensor, layout: LookatLayout) -> torch.Tensor:
    """Inverse of :func:`quantize_values`, fp32 ``[..., D]``."""
    payload = data[..., : layout.value_bytes].contiguous()
    params = data[..., layout.value_bytes : layout.value_bytes + layout.param_bytes].contiguous()
    if layout.value_bits == 16:
        return payload.view(layout.value_dtype).float()
    if layout.value_bits == 8:
        return payload.view(torch.int8).float() * params.view(torch.float16).float()
    scale_low = params.view(torch.float16).float()
    q = torch.stack([payload & 15, payload >> 4], -1).flatten(-2).float()
    return q * scale_low[..., :1] + scale_low[..., 1:2]


def permute(x: torch.Tensor, dims: torch.Tensor | None) -> torch.Tensor:
    return x if dims is None else x[..., dims.flatten()]


def encode_rows(key: torch.Tensor, value: torch.Tensor, codebooks: torch.Tensor, dims: torch.Tensor | None,
                layout: LookatLayout) -> torch.Tensor:
    """Cache rows ``[T, Hkv, row_bytes]`` for keys/values ``[T, Hkv, D]``."""
    codes = pq_ref.encode(permute(key, dims), codebooks)
    return torch.cat([codes, quantize_values(value, layout)], -1)


def write_rows(cache: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> None:
    """Rows ``[T, Hkv, row_bytes]`` at ``slots``; padding slots (< 0) store nothing, with no
    host synchronisation (:func:`paged_dense_ref.write_rows`)."""
    paged_dense_ref.write_rows(cache, rows, slots)


def encode_write(cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor,
                 codebooks: torch.Tensor, dims: torch.Tensor | None, layout: LookatLayout) -> None:
    """:func:`encode_rows` of ``key`` / ``value`` ``[T, Hkv, D]``, stored at ``slots`` (:func:`write_rows`)."""
    write_rows(cache, encode_rows(key, value, codebooks, dims, layout), slots)


def split_rows(rows: torch.Tensor, layout: LookatLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes uint8 [..., m], values fp32 [..., D])``."""
    return rows[..., : layout.m], dequantize_values(rows[..., layout.m :], layout)


def decode_attention(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, kv_lens: torch.Tensor,
                     codebooks: torch.Tensor, dims: torch.Tensor | None, layout: LookatLayout, scale: float,
                     current: tuple[torch.Tensor, torch.Tensor] | None = None,
                     max_kv_len: int | None = None) -> torch.Tensor:
    """One query per request ``[B, Hq, D]`` over ``kv_lens`` coded tokens; ``current``
    (exact key/value ``[B, Hkv, D]``) replaces each request's last token. ``max_kv_len``:
    a host bound on ``kv_lens`` (else read back from the device, a synchronisation)."""
    batch, num_q_heads, head_dim = query.shape
    num_kv_heads, m = codebooks.shape[0], layout.m
    group = num_q_heads // num_kv_heads
    max_len = int(kv_lens.max()) if max_kv_len is None else int(max_kv_len)
    codes, values = split_rows(gather_rows(cache, block_table[:batch], max_len), layout)  # [B, Hkv, L, *]
    q = permute(query.float(), dims)
    lut = torch.einsum("bhgms,hmks->bhmkg", pq_ref.split(q.view(batch, num_kv_heads, group, head_dim), m),
                       codebooks.float())  # [B, Hkv, m, K, g]
    index = codes.long().transpose(2, 3).unsqueeze(-1).expand(-1, -1, -1, -1, group)  # [B, Hkv, m, L, g]
    logits = lut.gather(3, index).sum(2).transpose(2, 3) * scale  # [B, Hkv, g, L]
    if current is not None:
        last = (kv_lens.long() - 1).clamp_min(0).view(batch, 1, 1, 1).expand(-1, num_kv_heads, group, 1)
        exact = (query.float().view(batch, num_kv_heads, group, head_dim) * current[0].float().unsqueeze(2)).sum(-1)
        logits = logits.scatter(3, last, exact.unsqueeze(-1) * scale)
        values = values.scatter(2, last[..., :1, :].expand(-1, num_kv_heads, 1, head_dim),
                                current[1].float().unsqueeze(2))
    valid = torch.arange(max_len, device=logits.device).unsqueeze(0) < kv_lens.to(logits.device).unsqueeze(1)
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.matmul(torch.softmax(logits, -1), values)  # [B, Hkv, g, D]
    return out.reshape(batch, num_q_heads, head_dim)


def rebuilt_keys(codes: torch.Tensor, codebooks: torch.Tensor, dims: torch.Tensor | None) -> torch.Tensor:
    """Keys ``[Hkv, L, D]`` (original dimension order) from codes ``[Hkv, L, m]``."""
    keys = pq_ref.decode(codes.transpose(0, 1), codebooks).transpose(0, 1)  # permuted order
    if dims is None:
        return keys
    return keys[..., torch.argsort(dims.flatten())]


def centroid_square_norms(codebooks: torch.Tensor) -> torch.Tensor:
    """``[Hkv, m, K]``: each centroid's squared L2 norm, from codebooks ``[Hkv, m, K, D / m]``."""
    return codebooks.float().square().sum(-1)


def code_key_norms(codes: torch.Tensor, square_norms: torch.Tensor) -> torch.Tensor:
    """L2 norms (fp32) of the keys that codes ``[R, Hkv, L, m]`` rebuild, without rebuilding
    them: the subspaces are disjoint coordinates (a permutation of the key's), so a rebuilt
    key's squared norm is the sum of its centroids' squared norms ``square_norms[Hkv, m, K]``."""
    batch, heads, length, m = codes.shape
    table = square_norms.unsqueeze(0).expand(batch, -1, -1, -1)  # [R, H, m, K]
    picked = table.gather(3, codes.long().transpose(2, 3))  # [R, H, m, L]
    return picked.sum(2).sqrt()


def prefill_attention(query: torch.Tensor, cache: torch.Tensor, blocks: torch.Tensor, kv_len: int,
                      codebooks: torch.Tensor, dims: torch.Tensor | None, layout: LookatLayout, scale: float,
                      current: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Causal attention of one request's ``q_len`` new queries ``[q_len, Hq, D]`` over its
    ``kv_len`` tokens; ``current`` = exact ``(key, value)`` ``[q_len, Hkv, D]`` of the new tokens."""
    q_len, num_q_heads, _ = query.shape
    codes, values = split_rows(gather_rows(cache, blocks[None], kv_len)[0], layout)
    keys = rebuilt_keys(codes, codebooks, dims)
    if current is not None:
        keys[:, kv_len - q_len :] = current[0].transpose(0, 1).float()
        values[:, kv_len - q_len :] = current[1].transpose(0, 1).float()
    # In the model's dtype, as the dense path: attention accumulates in fp32 either way.
    return paged_dense_ref.causal_attend(query, keys.to(query.dtype), values.to(query.dtype), scale)
