"""A request's compression schedule from the plugin settings and its own overrides.

Per-request overrides come from ``SamplingParams(extra_args={"kvcompress": {...}})``
with the keys in :data:`REQUEST_KEYS`; the scheduler and the worker both call
:meth:`EvictionPolicy.schedule_for`, so they agree on every compression point.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

from vllm_kvcompress.config import CONFIG_KEY, STREAM_METHODS, WINDOW_METHODS, KVCompressConfig, KVCompressConfigError
from vllm_kvcompress.eviction.headkv import HeadScores, allocate_budgets, load_head_scores
from vllm_kvcompress.eviction.schedule import CompressionSchedule
from vllm_kvcompress.eviction.streams import NEVER, StreamSchedule
from vllm_kvcompress.eviction.threshold import ThresholdSchedule
from vllm_kvcompress.parallel import kv_heads_of_rank

REQUEST_KEYS = ("compression_ratio", "max_kv_tokens")


# The OpenAI API's ``vllm_xargs`` takes only numbers, strings and lists, so a request can
# also give ``{"kvcompress_compression_ratio": 0.5}`` instead of ``{"kvcompress": {...}}``.
FLAT_PREFIX = CONFIG_KEY + "_"


def request_overrides(extra_args: dict | None) -> dict[str, Any]:
    extra = extra_args or {}
    raw = extra.get(CONFIG_KEY)
    flat = {key[len(FLAT_PREFIX):]: value for key, value in extra.items() if key.startswith(FLAT_PREFIX)}
    allowed = f"{', '.join(REQUEST_KEYS)} (or the flat keys {', '.join(FLAT_PREFIX + k for k in REQUEST_KEYS)})"
    if raw is not None and not isinstance(raw, dict):
        raise KVCompressConfigError(
            f"SamplingParams.extra_args[{CONFIG_KEY!r}] must be an object with keys from {allowed}; got {raw!r}")
    overrides = {**(raw or {}), **flat}
    if set(overrides) - set(REQUEST_KEYS):
        unknown = sorted(set(overrides) - set(REQUEST_KEYS))
        raise KVCompressConfigError(
            f"SamplingParams.extra_args[{CONFIG_KEY!r}]: unknown setting(s) {', '.join(unknown)}; keys from {allowed}")
    if len(overrides) > 1:
        raise KVCompressConfigError(f"SamplingParams.extra_args[{CONFIG_KEY!r}]: set at most one of {', '.join(REQUEST_KEYS)}")
    return overrides


def has_request_settings(extra_args: dict | None) -> bool:
    return isinstance(extra_args, dict) and any(k == CONFIG_KEY or k.startswith(FLAT_PREFIX) for k in extra_args)


def validate_overrides(config: KVCompressConfig, extra_args: dict | None) -> dict[str, Any]:
    """A request's budget overrides, checked as the engine's settings would be."""
    overrides = request_overrides(extra_args)
    if overrides:
        try:
            dataclasses.replace(config, **{"max_kv_tokens": None, "compression_ratio": None, **overrides}).validate()
        except KVCompressConfigError as exc:
            raise KVCompressConfigError(str(exc).replace(f"additional_config.{CONFIG_KEY}.",
                                                         f"per-request setting {CONFIG_KEY}.")) from None
    return overrides


def model_shape(vllm_config) -> tuple[int, int, int]:
    """(layers, query heads, KV heads) of the whole model (HeadKV scores cover all of them)."""
    hf = vllm_config.model_config.hf_text_config
    return hf.num_hidden_layers, hf.num_attention_heads, getattr(hf, "num_key_value_heads", hf.num_attention_heads)


def dms_window(config: KVCompressConfig) -> int:
    """The configured DMS window, else the checkpoint's; whole pages either way."""
    from vllm_kvcompress.eviction.dms_checkpoint import DMSCheckpointError, checkpoint_window

    if config.dms_window is not None:
        return config.dms_window
    try:
        window = checkpoint_window(config.dms_adapters)
    except DMSCheckpointError as exc:
        raise KVCompressConfigError(f"additional_config.{CONFIG_KEY}.dms_adapters: {exc}") from None
    if window % config.page_tokens:
        raise KVCompressConfigError(
            f"{config.dms_adapters} was trained with window {window}, not a multiple of additional_config."
            f"{CONFIG_KEY}.page_tokens={config.page_tokens}; set page_tokens to a divisor of it")
    return window


class EvictionPolicy:
    """``model_shape`` = (layers, query heads, KV heads), needed by the stream methods.

    With tensor parallelism (``tp_size`` > 1) budgets are set over the whole model's
    streams, and a schedule holds ``tp_rank``'s share of them plus every rank's (the
    scheduler's block counts cover the neediest rank)."""

    def __init__(self, config: KVCompressConfig, block_size: int, model_shape: tuple[int, int, int] | None = None,
                 tp_rank: int = 0, tp_size: int = 1):
        self.config = config
        self.block_size = block_size
        # SnapKV/HeadKV compress once, at the prompt end (as in the papers): no decode compaction.
        self.buffer = NEVER if config.method in WINDOW_METHODS else config.buffer_blocks * block_size
        self.stream_scores = None
        if config.method in STREAM_METHODS:
            if model_shape is None:
                raise ValueError(f"{config.method} needs the model's (layers, query heads, KV heads)")
            if self.block_size % config.page_tokens:
                raise KVCompressConfigError(
                    f"additional_config.{CONFIG_KEY}.page_tokens={config.page_tokens} must divide the KV block "
                    f"size {block_size}")
            self.layers, self.kv_heads = model_shape[0], model_shape[2]
            self.rank_heads = [kv_heads_of_rank(self.kv_heads, tp_size, rank) for rank in range(tp_size)]
            self.tp_rank = tp_rank
            self.streams = self.layers * len(self.rank_heads[tp_rank])  # this rank's streams
        if config.method == "kvzap":
            self.stream_scores = [1.0] * (self.layers * self.kv_heads)  # top-k mode: one budget for every stream
        if config.method == "dms":
            self.dms_window = dms_window(config)
        if config.method == "headkv":
            if config.head_scores == "uniform":
                scores = HeadScores.uniform(*model_shape)
            else:
                scores = load_head_scores(config.head_scores, *model_shape)
            self.stream_scores = scores.kv_head_scores()

    @functools.lru_cache(maxsize=256)
    def stream_budgets(self, average: int) -> tuple[int, ...]:
        """Budgets of the whole model's streams (layer-major)."""
        c = self.config
        if c.method == "kvzap":
            return (average,) * len(self.stream_scores)
        return tuple(allocate_budgets(self.stream_scores, average, c.window_tokens, c.headkv_beta, c.page_tokens))

    def rank_budgets(self, budgets: tuple[int, ...], rank: int) -> tuple[int, ...]:
        """The budgets of the streams rank ``rank`` holds (its KV heads of every layer)."""
        return tuple(budgets[layer * self.kv_heads + head] for layer in range(self.layers)
                     for head in self.rank_heads[rank])

    def budget(self, prompt_len: int, overrides: dict[str, Any]) -> int | None:
        """Rows kept per (layer, KV head); None = keep everything."""
        ratio = overrides.get("compression_ratio", None)
        tokens = overrides.get("max_kv_tokens", None)
        if not overrides:
            ratio, tokens = self.config.compression_ratio, self.config.max_kv_tokens
        if tokens is not None:
            budget = int(tokens)
        elif ratio is not None:
            if ratio == 0:
                return None
            # kvpress keeps int(n * (1 - ratio)); the epsilon keeps 1000 * (1 - 0.9) at 100, not 99.
            budget = math.floor(prompt_len * (1 - float(ratio)) + 1e-9)
        else:
            return None
        return max(budget, self.config.sink_tokens + self.config.recent_tokens, 1)

    def schedule_for(self, prompt_len: int, extra_args: dict | None) -> CompressionSchedule | None:
        overrides = validate_overrides(self.config, extra_args)
        c = self.config
        if c.method == "dms":  # KVzap's threshold rule on keep score -z, threshold 0, decisions one token late
            return ThresholdSchedule(compress_at=max(prompt_len, self.dms_window), ring=self.dms_window,
                                     streams=self.streams, page=c.page_tokens, block_size=self.block_size,
                                     threshold=0.0, delayed=True)
        if c.method == "kvzap" and c.kvzap_threshold is not None:
            return ThresholdSchedule(compress_at=max(prompt_len, c.kvzap_window), ring=c.kvzap_window,
                                     streams=self.streams, page=c.page_tokens, block_size=self.block_size,
                                     threshold=float(c.kvzap_threshold))
        budget = self.budget(prompt_len, overrides)
        if budget is None:
            return None
        window = self.config.window_tokens if self.config.method in WINDOW_METHODS else 0
        if self.stream_scores is not None:
            budgets = self.stream_budgets(budget)
            if min(budgets) >= prompt_len:
                return None  # nothing to evict in any stream: stay in vLLM's layout
            ranks = tuple(self.rank_budgets(budgets, rank) for rank in range(len(self.rank_heads)))
            return StreamSchedule(compress_at=prompt_len, budgets=ranks[self.tp_rank], page=self.config.page_tokens,
                                  block_size=self.block_size, window=window, rank_budgets=ranks if len(ranks) > 1 else ())
        return CompressionSchedule(compress_at=max(prompt_len, 1), budget=budget, buffer=self.buffer, window=window)
