"""Method ``kvzap`` (Jégou & Jeblick, 2026): a learned predictor scores every token from
its attention-input hidden state (forward pre-hooks, :mod:`.hooks`), one score per KV
head, kept next to its cache row. Threshold mode (the paper's) wraps the scores in
:class:`~vllm_kvcompress.eviction.threshold.ThresholdRule`; top-k mode keeps each
(layer, KV head)'s best tokens at the prompt end."""

from __future__ import annotations

import math
from dataclasses import dataclass

from vllm_kvcompress.eviction.threshold import ThresholdRule
from vllm_kvcompress.methods.base import (BudgetSettings, KVCompressConfigError, LearnedScores, Method, PagedSettings,
                                          check_number, check_path, key_name, setting)


@dataclass(frozen=True)
class KVzapSettings(BudgetSettings, PagedSettings):
    kvzap_predictor: str | None = setting(
        None, "KVzap: predictor file (safetensors from `python -m vllm_kvcompress.offline.kvzap_train`) or a "
              "published `nvidia/KVzap-*` folder (config.json + model.safetensors). Required for `kvzap`.")
    kvzap_threshold: float | None = setting(
        None, "KVzap threshold mode: a token leaving the window is evicted for a KV head when its predicted "
              "log-score is below this (the paper: -4 for Qwen3-8B). Set this or a budget "
              "(`compression_ratio`/`max_kv_tokens`: top-k per KV head at the prompt end), not both.")
    kvzap_window: int = setting(
        128, "KVzap threshold mode: newest tokens never evicted (a multiple of `page_tokens`).")

    def validate(self) -> None:
        super().validate()
        check_path("kvzap_predictor", self.kvzap_predictor, "kvzap",
                   "a file from `python -m vllm_kvcompress.offline.kvzap_train --model MODEL --out DIR` or a "
                   "published nvidia/KVzap-* folder")
        threshold = self.kvzap_threshold
        if (threshold is None) == (not self.has_budget):
            raise KVCompressConfigError(
                f"method 'kvzap' needs exactly one of {key_name('kvzap_threshold')} (threshold mode, the paper's) or "
                f"a budget {key_name('compression_ratio')}/{key_name('max_kv_tokens')} (top-k per KV head at the "
                "prompt end)")
        if threshold is not None:
            check_number("kvzap_threshold", threshold, math.isfinite, "a finite number (a log-score)")
            if self.min_kv_tokens:
                raise KVCompressConfigError(f"{key_name('min_kv_tokens')} applies to budgets; with "
                                            f"{key_name('kvzap_threshold')} the predictor's threshold decides alone")
        self.check_window("kvzap_window")


class KVzap(Method):
    name = "kvzap"
    Settings = KVzapSettings
    summary = "evicts by a learned predictor's score (threshold or top-k per KV head)"
    evicts = True
    learned = True
    compiled_scores = True
    own_window = "kvzap_window"

    def load(self, shape):
        from vllm_kvcompress.methods.kvzap.predictors import load_any_predictors

        return load_any_predictors(self.settings.kvzap_predictor, shape.num_layers, shape.hidden_size,
                                   shape.num_kv_heads)

    def check_model(self, shape, hf_config, block_size, tp_size) -> None:
        from vllm_kvcompress.methods.kvzap.predictors import PredictorFileError

        try:
            self.load(shape)
        except PredictorFileError as exc:
            raise KVCompressConfigError(f"{key_name('kvzap_predictor')}: {exc}") from None

    def rule(self):
        s = self.settings
        return None if s.kvzap_threshold is None else ThresholdRule(s.kvzap_threshold, s.kvzap_window)

    def schedule(self, prompt_len, budget, streams):
        s = self.settings
        if (rule := self.rule()) is not None:
            return rule.schedule(prompt_len, streams.count, s.page_tokens, streams.block_size)
        if budget is None:
            return None
        return streams.budget_schedule(prompt_len, (budget,) * streams.total, s.page_tokens)

    def install(self, model, shape, heads, tp_size, device, record, max_tokens=None):
        from vllm_kvcompress.methods.kvzap import hooks

        predictors = [p.to(device) for p in self.load(shape)]
        if max_tokens is None:  # the scores go to ``record`` (offline use, eager)
            return LearnedScores(hooks.install(model, predictors, record, heads))
        handles, buffers, install = hooks.install_buffered(model, predictors, max_tokens, record, heads)
        return LearnedScores(handles, score_buffers=buffers, scores_install=install)
