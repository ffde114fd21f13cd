"""Eviction scorers: one small class per method, ``score(...) -> [H, T]``, higher = keep.

Inputs are the cached rows of one request and layer, per KV head: ``keys``/``values``
``[H, T, D]`` as stored (post-RoPE); ``hidden``/``queries`` are for methods that need
them (KVzap, SnapKV-style selection) and may be None.
"""

from __future__ import annotations

import math

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


class SnapKVScorer(Scorer):
    """SnapKV-style selection (as HeadKV uses it): attention of the last ``window`` prompt
    queries over the prompt, averaged over those queries and the KV head's query group,
    then max-pooled along positions (kernel ``kernel``, stride 1, same padding). Only the
    window's ``[Hq, window, T]`` logits exist, never the full attention. The window's own
    rows score +inf: they are always kept."""

    name = "snapkv"

    def __init__(self, window: int = 8, kernel: int = 7):
        self.window, self.kernel = window, kernel

    def window_queries(self, query: torch.Tensor, token_end: int, length: int) -> torch.Tensor:
        """The window's queries ``[Hq, w, D]`` of a request whose tokens in this step's
        ``query[T, Hq, D]`` end at ``token_end`` (the prompt's last tokens)."""
        return query[token_end - min(self.window, length): token_end].transpose(0, 1)

    def score(self, keys, values=None, hidden=None, queries=None):
        if queries is None:
            raise ValueError("SnapKV scores need the window's queries")
        heads, length, dim = keys.shape
        window = min(queries.shape[1], length)
        queries = queries[:, -window:].float()
        group = queries.shape[0] // heads
        grouped = queries.reshape(heads, group * window, dim)
        logits = grouped @ keys.float().transpose(1, 2) / math.sqrt(dim)  # [H, G*w, T]
        query_pos = (length - window + torch.arange(window)).repeat(group)
        logits.masked_fill_(torch.arange(length)[None, :] > query_pos[:, None], float("-inf"))
        weights = torch.softmax(logits, dim=-1).mean(dim=1)  # [H, T]
        prefix = length - window
        scores = torch.full((heads, length), float("inf"))
        if prefix > 0:
            pad = self.kernel // 2
            scores[:, :prefix] = torch.nn.functional.max_pool1d(weights[:, None, :prefix], self.kernel, stride=1,
                                                                 padding=pad)[:, 0, :prefix]
        return scores


def scorer_for(settings) -> Scorer:
    """The scorer of an eviction method (``snapkv`` and ``headkv`` select alike)."""
    if settings.method in ("snapkv", "headkv"):
        return SnapKVScorer(settings.window_tokens, settings.pool_kernel)
    if settings.method == KnormScorer.name:
        return KnormScorer()
    raise ValueError(f"no scorer for method {settings.method!r}")
