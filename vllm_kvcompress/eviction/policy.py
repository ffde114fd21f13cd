"""A request's compression schedule from the plugin settings and its own overrides.

Per-request overrides come from ``SamplingParams(extra_args={"kvcompress": {...}})``
with the keys in :data:`REQUEST_KEYS`; the scheduler and the worker both call
:meth:`EvictionPolicy.schedule_for`, so they agree on every compression point.
"""

from __future__ import annotations

import math
from typing import Any

from vllm_kvcompress.config import CONFIG_KEY, KVCompressConfig, KVCompressConfigError
from vllm_kvcompress.eviction.schedule import CompressionSchedule

REQUEST_KEYS = ("compression_ratio", "max_kv_tokens")


def request_overrides(extra_args: dict | None) -> dict[str, Any]:
    raw = (extra_args or {}).get(CONFIG_KEY) or {}
    if not isinstance(raw, dict) or set(raw) - set(REQUEST_KEYS):
        raise KVCompressConfigError(
            f"SamplingParams.extra_args[{CONFIG_KEY!r}] must be an object with keys from {', '.join(REQUEST_KEYS)}; "
            f"got {raw!r}"
        )
    if len(raw) > 1:
        raise KVCompressConfigError(f"SamplingParams.extra_args[{CONFIG_KEY!r}]: set at most one of {', '.join(REQUEST_KEYS)}")
    return raw


class EvictionPolicy:
    def __init__(self, config: KVCompressConfig, block_size: int):
        self.config = config
        self.buffer = config.buffer_blocks * block_size

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
        overrides = request_overrides(extra_args)
        probe = KVCompressConfig(method=self.config.method, **overrides) if overrides else None
        if probe is not None:
            probe.validate()
        budget = self.budget(prompt_len, overrides)
        if budget is None:
            return None
        return CompressionSchedule(compress_at=max(prompt_len, 1), budget=budget, buffer=self.buffer)
