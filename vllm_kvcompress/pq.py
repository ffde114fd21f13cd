"""k-means codebooks for product-quantized keys (LOOKAT), engine-neutral.

Deterministic: k-means++ seeding from a fixed ``torch.Generator`` seed, then Lloyd
iterations in fp32. Fitted independently per (KV head, subspace) — batched, so a whole
layer is one call.
"""

from __future__ import annotations

import torch

from vllm_kvcompress.kernels.pq_ref import split


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeds for each batch row: ``x[B, N, s]`` -> ``[B, k, s]``."""
    batch, n, _ = x.shape
    rows = torch.arange(batch)
    first = torch.randint(n, (batch,), generator=gen)
    centers = [x[rows, first]]
    d2 = ((x - centers[0].unsqueeze(1)) ** 2).sum(-1)
    for _ in range(1, k):
        probs = d2 / d2.sum(-1, keepdim=True).clamp_min(1e-30)
        pick = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        centers.append(x[rows, pick])
        d2 = torch.minimum(d2, ((x - centers[-1].unsqueeze(1)) ** 2).sum(-1))
    return torch.stack(centers, 1)


def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Batched Lloyd k-means: ``x[B, N, s]`` -> centroids ``[B, k, s]`` (fp32). An emptied
    cluster keeps its previous centroid."""
    if x.shape[1] < k:
        raise ValueError(f"need at least k={k} calibration vectors, got {x.shape[1]}")
    x = x.float()
    gen = torch.Generator().manual_seed(seed)
    centers = _kmeans_pp(x, k, gen)
    for _ in range(iters):
        dist = (centers * centers).sum(-1).unsqueeze(1) - 2 * x @ centers.transpose(1, 2)  # [B, N, k]
        assign = dist.argmin(-1)
        sums = torch.zeros_like(centers).scatter_add_(1, assign.unsqueeze(-1).expand_as(x), x)
        counts = torch.zeros(centers.shape[:2]).scatter_add_(1, assign, torch.ones(assign.shape))
        centers = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp_min(1).unsqueeze(-1), centers)
    return centers


def fit_codebooks(keys: torch.Tensor, m: int, k: int = 256, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Codebooks ``[Hkv, m, K, D/m]`` from one layer's calibration keys ``[Hkv, N, D]``."""
    heads = keys.shape[0]
    sub = split(keys.float(), m).permute(0, 2, 1, 3).flatten(0, 1)  # [Hkv*m, N, s]
    return kmeans(sub, k, iters, seed).unflatten(0, (heads, m))
