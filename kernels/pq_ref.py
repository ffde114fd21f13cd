"""PyTorch reference for product-quantized keys and ADC (asymmetric distance) scoring.

A key of ``head_dim`` values is split into ``m`` contiguous sub-vectors of ``sub = head_dim / m``;
each is stored as the index (uint8, K <= 256) of its nearest centroid in that subspace's
codebook. Queries are never quantized: a lookup table ``lut[h, i, j] = <q_h[i], C[i][j]>``
turns the logit of any cached key into ``sum_i lut[h, i, code_i]`` without rebuilding it.

Shapes (one layer):
* ``codebooks[Hkv, m, K, sub]``: one codebook set per KV head (a GQA group shares codes).
* ``codes[..., Hkv, m]`` uint8.
* queries ``[Hq, D]`` with ``Hq = Hkv * group`` (query head h reads KV head h // group).
"""

from __future__ import annotations

import torch


def split(x: torch.Tensor, m: int) -> torch.Tensor:
    """``[..., D] -> [..., m, D / m]``."""
    if x.shape[-1] % m:
        raise ValueError(f"head_dim {x.shape[-1]} is not divisible by m={m}")
    return x.unflatten(-1, (m, x.shape[-1] // m))


def encode(keys: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Nearest-centroid codes: keys ``[T, Hkv, D]`` -> ``[T, Hkv, m]`` uint8 (fp32 distances)."""
    m = codebooks.shape[1]
    sub = split(keys.float(), m)  # [T, Hkv, m, s]
    cb = codebooks.float()  # [Hkv, m, K, s]
    # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 does not change the argmin.
    dots = torch.einsum("thms,hmks->thmk", sub, cb)
    dist = (cb * cb).sum(-1).unsqueeze(0) - 2 * dots
    return dist.argmin(-1).to(torch.uint8)


def decode(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Rebuilt keys ``[T, Hkv, D]`` (for measurements only; attention never does this)."""
    heads, m = codebooks.shape[0], codebooks.shape[1]
    idx = codes.long()  # [T, Hkv, m]
    h = torch.arange(heads, device=codebooks.device).view(1, heads, 1)
    i = torch.arange(m, device=codebooks.device).view(1, 1, m)
    return codebooks[h, i, idx].flatten(-2)


def adc_tables(queries: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """``lut[Hq, m, K] = <q_h[i], C_{h // group}[i][j]>`` in fp32."""
    hkv, m = codebooks.shape[0], codebooks.shape[1]
    group = queries.shape[0] // hkv
    q = split(queries.float(), m).unflatten(0, (hkv, group))  # [Hkv, g, m, s]
    return torch.einsum("hgms,hmks->hgmk", q, codebooks.float()).flatten(0, 1)


def adc_logits(lut: torch.Tensor, codes: torch.Tensor, scale: float) -> torch.Tensor:
    """Logits ``[Hq, T]`` of every query head over keys coded as ``codes[T, Hkv, m]``."""
    hq, m, _ = lut.shape
    hkv = codes.shape[1]
    group = hq // hkv
    idx = codes.long().permute(1, 2, 0).repeat_interleave(group, dim=0)  # [Hq, m, T]
    return lut.gather(-1, idx).sum(1) * scale
