"""A request's compression schedule from the plugin settings and its own overrides.

Per-request overrides come from ``SamplingParams(extra_args={"kvcompress": {...}})``
with the keys in :data:`REQUEST_KEYS`; the scheduler and the worker both call
:meth:`EvictionPolicy.schedule_for`, so they agree on every compression point. The
method decides the schedule's shape (:meth:`~vllm_kvcompress.methods.base.Method.schedule`);
the budget arithmetic is shared.
"""

from __future__ import annotations

from typing import Any

from vllm_kvcompress.config import CONFIG_KEY, KVCompressConfig, KVCompressConfigError
from vllm_kvcompress.eviction.streams import RankStreams
from vllm_kvcompress.methods.base import BudgetSettings, ModelShape, PagedSettings, floor_budget

REQUEST_KEYS = BudgetSettings.BUDGET_KEYS

# The OpenAI API's ``vllm_xargs`` takes only numbers, strings and lists, so a request can
# also give ``{"kvcompress_compression_ratio": 0.5}`` instead of ``{"kvcompress": {...}}``.
FLAT_PREFIX = CONFIG_KEY + "_"


def request_overrides(extra_args: dict | None) -> dict[str, Any]:
    extra = extra_args or {}
    raw = extra.get(CONFIG_KEY)
    flat = {key[len(FLAT_PREFIX):]: value for key, value in extra.items() if key.startswith(FLAT_PREFIX)}
    allowed = f"{', '.join(sorted(REQUEST_KEYS))} (or the flat keys {', '.join(FLAT_PREFIX + k for k in sorted(REQUEST_KEYS))})"
    if raw is not None and not isinstance(raw, dict):
        raise KVCompressConfigError(
            f"SamplingParams.extra_args[{CONFIG_KEY!r}] must be an object with keys from {allowed}; got {raw!r}")
    overrides = {**(raw or {}), **flat}
    if set(overrides) - set(REQUEST_KEYS):
        unknown = sorted(set(overrides) - set(REQUEST_KEYS))
        raise KVCompressConfigError(
            f"SamplingParams.extra_args[{CONFIG_KEY!r}]: unknown setting(s) {', '.join(unknown)}; keys from {allowed}")
    if len(overrides) > 1:
        raise KVCompressConfigError(
            f"SamplingParams.extra_args[{CONFIG_KEY!r}]: set at most one of {', '.join(sorted(REQUEST_KEYS))}")
    return overrides


def has_request_settings(extra_args: dict | None) -> bool:
    return isinstance(extra_args, dict) and any(k == CONFIG_KEY or k.startswith(FLAT_PREFIX) for k in extra_args)


def validate_overrides(config: KVCompressConfig, extra_args: dict | None) -> dict[str, Any]:
    """A request's budget overrides, checked as the engine's settings would be."""
    overrides = request_overrides(extra_args)
    if overrides:
        try:
            config.with_budget(overrides)
        except KVCompressConfigError as exc:
            raise KVCompressConfigError(str(exc).replace(f"additional_config.{CONFIG_KEY}.",
                                                         f"per-request setting {CONFIG_KEY}.")) from None
    return overrides


def model_shape(vllm_config) -> ModelShape:
    """The whole model's shape (HeadKV scores and learned predictors cover all of it)."""
    return ModelShape.of(vllm_config.model_config.hf_text_config)


class EvictionPolicy:
    """One per process and side (scheduler, each worker rank). ``model_shape``: a
    :class:`ModelShape` or ``(layers, query heads, KV heads)``; needed by the methods
    with per-(layer, KV head) streams. With tensor parallelism (``tp_size`` > 1) budgets
    are set over the whole model's streams (see :class:`RankStreams`)."""

    def __init__(self, config: KVCompressConfig, block_size: int, model_shape=None, tp_rank: int = 0,
                 tp_size: int = 1):
        self.config = config
        self.method = config.build()
        self.block_size = block_size
        shape = ModelShape(*model_shape) if isinstance(model_shape, tuple) else model_shape
        settings = config.settings
        if isinstance(settings, PagedSettings):
            if shape is None:
                raise ValueError(f"{config.method} needs the model's (layers, query heads, KV heads)")
            if block_size % settings.page_tokens:
                raise KVCompressConfigError(
                    f"additional_config.{CONFIG_KEY}.page_tokens={settings.page_tokens} must divide the KV block "
                    f"size {block_size}")
        self.streams = RankStreams(block_size, shape, tp_rank, tp_size)

    def budget(self, prompt_len: int, overrides: dict[str, Any]) -> int | None:
        """Rows kept per sequence (per (layer, KV head) on average); None = keep everything."""
        settings = self.config.settings
        if not isinstance(settings, BudgetSettings):
            return None
        ratio, tokens = overrides.get("compression_ratio"), overrides.get("max_kv_tokens")
        if not overrides:
            ratio, tokens = settings.compression_ratio, settings.max_kv_tokens
        return floor_budget(prompt_len, tokens, ratio, max(self.method.min_budget(), settings.min_kv_tokens))

    def schedule_for(self, prompt_len: int, extra_args: dict | None):
        overrides = validate_overrides(self.config, extra_args)
        if prompt_len <= getattr(self.config.settings, "min_kv_tokens", 0):
            return None  # a short prompt is left whole (HeadKV's per-head budgets would still cut some heads)
        return self.method.schedule(prompt_len, self.budget(prompt_len, overrides), self.streams)
