"""Method ``snapkv``: per KV head, keep the tokens the prompt's last window attends to
most (max-pooled along positions), once, at the prompt end; decode tokens are appended."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vllm_kvcompress.eviction.schedule import CompressionSchedule
from vllm_kvcompress.eviction.scorers import Scorer
from vllm_kvcompress.eviction.streams import NEVER
from vllm_kvcompress.methods.base import BudgetSettings, KVCompressConfigError, Method, check_int, key_name, setting


@dataclass(frozen=True)
class WindowSettings(BudgetSettings):
    window_tokens: int = setting(8, "SnapKV/HeadKV: the prompt's last tokens whose attention scores the rest "
                                    "(alpha); always kept. Behind a chat template the last 8 are the template's "
                                    "own tokens: 32 (the presets', the SnapKV paper's) reaches the question.")
    pool_kernel: int = setting(7, "SnapKV/HeadKV: max-pooling kernel along positions (odd integer >= 1).")

    def validate(self) -> None:
        super().validate()
        check_int("window_tokens", self.window_tokens, 1)
        check_int("pool_kernel", self.pool_kernel, 1)
        if self.pool_kernel % 2 == 0:
            raise KVCompressConfigError(f"{key_name('pool_kernel')} must be odd (same padding), got {self.pool_kernel}")


@dataclass(frozen=True)
class SnapKVSettings(WindowSettings):
    def validate(self) -> None:
        super().validate()
        self.require_budget('snapkv')


class SnapKVScorer(Scorer):
    """Attention of the last ``window`` prompt queries over the prompt, averaged over those
    queries and the KV head's query group, then max-pooled along positions (kernel
    ``kernel``, stride 1, same padding). Only the window's ``[Hq, window, T]`` logits
    exist, never the full attention. The window's own rows score +inf: always kept."""

    def __init__(self, window: int = 8, kernel: int = 7):
        self.window, self.kernel = window, kernel

    def window_queries(self, query: torch.Tensor, token_end: int, length: int) -> torch.Tensor:
        """The window's queries ``[Hq, w, D]`` of a request whose tokens in this step's
        ``query[T, Hq, D]`` end at ``token_end`` (the prompt's last tokens)."""
        return query[token_end - min(self.window, length): token_end].transpose(0, 1)

    def score(self, keys, queries=None):
        if queries is None:
            raise ValueError("SnapKV scores need the window's queries")
        heads, length, dim = keys.shape
        window = min(queries.shape[1], length)
        queries = queries[:, -window:].float()
        group = queries.shape[0] // heads
        grouped = queries.reshape(heads, group * window, dim)
        logits = grouped @ keys.float().transpose(1, 2) / math.sqrt(dim)  # [H, G*w, T]
        rows = torch.arange(length, device=keys.device)
        query_pos = rows[length - window:].repeat(group)
        logits.masked_fill_(rows[None, :] > query_pos[:, None], float("-inf"))
        weights = torch.softmax(logits, dim=-1).mean(dim=1)  # [H, T]
        prefix = length - window
        scores = torch.full((heads, length), float("inf"), device=keys.device)
        if prefix > 0:
            pad = self.kernel // 2
            scores[:, :prefix] = torch.nn.functional.max_pool1d(weights[:, None, :prefix], self.kernel, stride=1,
                                                                 padding=pad)[:, 0, :prefix]
        return scores


class SnapKV(Method):
    name = "snapkv"
    Settings = SnapKVSettings
    summary = "keeps, per KV head, the tokens the prompt's last window attends to most"
    evicts = True
    own_window = "window_tokens"

    def schedule(self, prompt_len, budget, streams):
        if budget is None:
            return None
        # Compressed once, at the prompt end (as in the paper): no decode compaction.
        # The compressing step holds at least two prompt tokens, so it is never a single-token
        # decode step, which may replay from a CUDA graph: the window's queries are kept by
        # the attention layer's Python, which a replay skips.
        return CompressionSchedule(compress_at=max(prompt_len, 1), budget=budget, buffer=NEVER,
                                   window=max(self.settings.window_tokens, 2))

    def scorer(self):
        return SnapKVScorer(self.settings.window_tokens, self.settings.pool_kernel)
