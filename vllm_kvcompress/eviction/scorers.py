"""The scorer interface (kvpress's ``ScorerPress.score``): one request's cached keys of
one layer, per KV head ``[H, T, D]`` as stored (post-RoPE), and, for scorers that need
them, the window's queries ``[Hq, w, D]`` -> scores ``[H, T]``, higher = keep.

Scorers live with their methods (:mod:`vllm_kvcompress.methods`)."""

from __future__ import annotations

import torch


class Scorer:
    window = 0  # prompt tokens whose queries the compressing step must hold (0: none)

    def score(self, keys: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def score_batch(self, keys: torch.Tensor, lengths: list[int], queries: list | None = None) -> torch.Tensor:
        """Scores ``[R, H, L]`` of ``R`` requests' keys ``[R, H, L, D]`` (request ``r`` holds
        ``lengths[r]`` rows; the rest is padding, scored -inf), each as :meth:`score` would."""
        scores = torch.full(keys.shape[:3], float("-inf"), device=keys.device)
        for r, length in enumerate(lengths):
            scores[r, :, :length] = self.score(keys[r, :, :length], None if queries is None else queries[r])
        return scores

    def score_layers(self, layers: list, block_table: torch.Tensor, longest: int, lengths: list[int],
                     queries: dict | None = None) -> torch.Tensor:
        """Scores ``[L, R, H, longest]`` of a step's compacting requests in several layers
        at once: ``layers`` holds ``(layer index, cache, cache format)``, ``queries`` the
        window's queries per layer index. By default each layer's keys are read
        (``fmt.keys_batch``) and scored (:meth:`score_batch`) in turn."""
        return torch.stack([self.score_batch(fmt.keys_batch(index, cache, block_table, longest), lengths,
                                             None if not queries else queries.get(index))
                            for index, cache, fmt in layers])

    def window_queries(self, query: torch.Tensor, token_end: int, length: int) -> torch.Tensor | None:
        """The queries :meth:`score` needs from the step's ``query[T, Hq, D]``; None = none."""
        return None
