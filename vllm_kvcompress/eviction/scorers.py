"""Eviction scorers: one small class per method, ``score(...) -> [H, T]``, higher = keep.

Inputs are the cached rows of one request and layer, per KV head: ``keys``/``values``
``[H, T, D]`` as stored (post-RoPE); ``hidden``/``queries`` are for methods that need
them (KVzap, SnapKV-style selection) and may be None.
"""

from __future__ import annotations

import torch


class Scorer:
    name = "base"

    def score(self, keys: torch.Tensor, values: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
              queries: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


class KnormScorer(Scorer):
    """Devoto et al. (EMNLP 2024): keys with the *lowest* L2 norm matter most.
    RoPE preserves norms, so post-RoPE cached keys give the paper's scores. fp32."""

    name = "knorm"

    def score(self, keys, values=None, hidden=None, queries=None):
        return -torch.linalg.vector_norm(keys.float(), dim=-1)


SCORERS: dict[str, type[Scorer]] = {KnormScorer.name: KnormScorer}
