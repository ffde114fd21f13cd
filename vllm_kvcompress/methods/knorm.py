"""Method ``knorm`` (Devoto et al., EMNLP 2024): evict the tokens whose keys have the
largest L2 norm, in whole rows, at the prompt end and every ``buffer_blocks`` blocks of
decode; the emptied blocks go back to vLLM's pool."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvcompress.eviction.schedule import CompressionSchedule
from vllm_kvcompress.eviction.scorers import Scorer
from vllm_kvcompress.methods.base import BudgetSettings, Method, check_choice, check_int, setting

EVICTION_MODES = ("compact", "mask")


@dataclass(frozen=True)
class KnormSettings(BudgetSettings):
    sink_tokens: int = setting(0, "Eviction: first tokens of each sequence that are never evicted (count towards "
                                  "the budget).")
    recent_tokens: int = setting(0, "Eviction: most recent tokens that are never evicted at a compression (count "
                                    "towards the budget).")
    buffer_blocks: int = setting(1, "Eviction: during decode the cache grows by this many blocks past the budget, "
                                    "then is compacted back to the budget (integer >= 1).")
    eviction_mode: str = setting("compact", "Eviction: `compact` moves kept tokens to the front and frees the "
                                            "emptied blocks; `mask` is the reference that keeps every row and hides "
                                            "evicted ones (same tokens kept, no memory saved; for validation).")

    def validate(self) -> None:
        super().validate()
        for name, minimum in (("sink_tokens", 0), ("recent_tokens", 0), ("buffer_blocks", 1)):
            check_int(name, getattr(self, name), minimum)
        check_choice("eviction_mode", self.eviction_mode, EVICTION_MODES)
        self.require_budget('knorm')


class KnormScorer(Scorer):
    """Keys with the *lowest* L2 norm matter most. RoPE preserves norms, so post-RoPE
    cached keys give the paper's scores. fp32."""

    def score(self, keys, queries=None):
        return -torch.linalg.vector_norm(keys.float(), dim=-1)

    def score_batch(self, keys, lengths, queries=None):
        return self.score(keys)  # per row: padding rows are masked by the selection

    def score_layers(self, layers, block_table, longest, lengths, queries=None):
        """Formats that know their keys' norms give them for every layer at once, no keys
        rebuilt (dense rows: one launch on CUDA; LOOKAT rows: from the codes and per-centroid
        norms); the others rebuild keys layer by layer."""
        formats = {type(fmt) for _, _, fmt in layers}
        fmt = layers[0][2]
        if len(formats) == 1 and hasattr(fmt, "key_norms"):
            return -fmt.key_norms([cache for _, cache, _ in layers], block_table, longest,
                                  [index for index, _, _ in layers])
        return super().score_layers(layers, block_table, longest, lengths, queries)


class Knorm(Method):
    name = "knorm"
    Settings = KnormSettings
    summary = "evicts the tokens whose keys have the largest L2 norm"
    evicts = True

    def __init__(self, settings: KnormSettings):
        super().__init__(settings)
        self.masks = settings.eviction_mode == "mask"

    def min_budget(self) -> int:
        return self.settings.sink_tokens + self.settings.recent_tokens

    def schedule(self, prompt_len, budget, streams):
        if budget is None:
            return None
        return CompressionSchedule(compress_at=max(prompt_len, 1), budget=budget,
                                   buffer=self.settings.buffer_blocks * streams.block_size)

    def scorer(self):
        return KnormScorer()

    def protected(self) -> tuple[int, int]:
        """(sink, recent) rows kept at every compaction."""
        return self.settings.sink_tokens, self.settings.recent_tokens
