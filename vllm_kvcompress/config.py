"""The plugin's settings: one typed, validated object built from
``additional_config["kvcompress"]`` (``--additional-config '{"kvcompress": {...}}'``).

Every error names the key and the allowed values, and is raised in the front-end
process before any engine process starts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

CONFIG_KEY = "kvcompress"

AVAILABLE_METHODS = ("none", "lookat", "knorm", "snapkv", "headkv", "kvzap", "dms")
EVICTION_METHODS = ("knorm", "snapkv", "headkv", "kvzap", "dms")
# SnapKV-style selection at the prompt end, decode tokens appended (no decode compaction).
WINDOW_METHODS = ("snapkv", "headkv")
# Per-(layer, KV head) streams paged from the shared pool (variable lengths per head).
STREAM_METHODS = ("headkv", "kvzap", "dms")
# Scores from learned weights run as forward hooks, one score stored per pool row.
PREDICTED_METHODS = ("kvzap", "dms")
VALUE_BITS = (16, 8, 4)
CURRENT_TOKENS = ("coded", "exact")
EVICTION_MODES = ("compact", "mask")


class KVCompressConfigError(ValueError):
    """A bad ``kvcompress`` setting; the message names the key and what is allowed."""


def _key(name: str) -> str:
    return f"additional_config.{CONFIG_KEY}.{name}"


def _methods_of(name: str) -> str:
    return {"window_tokens": "snapkv, headkv", "pool_kernel": "snapkv, headkv", "page_tokens": "headkv, kvzap, dms"}.get(
        name, "headkv")


def _setting(default, doc: str):
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class KVCompressConfig:
    method: str = _setting(
        "none",
        "Compression method: `none` stores the full bf16/fp16 cache (pass-through); "
        "`lookat` stores keys as PQ codes and scores them with ADC lookup tables; "
        "`knorm` evicts the tokens whose keys have the largest L2 norm; `snapkv` keeps, per KV head, the "
        "tokens the prompt's last window attends to most; `headkv` does the same with a budget per "
        "(layer, KV head) from head-importance scores; `kvzap` evicts by a learned predictor's score; `dms` "
        "by a retrofitted model's own learned decisions, delayed by a window (eviction methods other than "
        "`kvzap` threshold mode and `dms` need a budget).",
    )
    max_kv_tokens: int | None = _setting(
        None,
        "Eviction budget: tokens kept per sequence (integer >= 1; `headkv`: the average over "
        "(layer, KV head) streams). Eviction methods only.",
    )
    compression_ratio: float | None = _setting(
        None,
        "Eviction budget: fraction of tokens removed, 0 <= r < 1. Eviction methods only.",
    )
    sink_tokens: int = _setting(
        0,
        "Eviction: first tokens of each sequence that are never evicted (count towards the budget).",
    )
    recent_tokens: int = _setting(
        0,
        "Eviction: most recent tokens that are never evicted at a compression (count towards the budget).",
    )
    buffer_blocks: int = _setting(
        1,
        "Eviction: during decode the cache grows by this many blocks past the budget, then is "
        "compacted back to the budget (integer >= 1).",
    )
    eviction_mode: str = _setting(
        "compact",
        "Eviction: `compact` moves kept tokens to the front and frees the emptied blocks; `mask` "
        "is the reference that keeps every row and hides evicted ones (same tokens kept, no memory "
        "saved; for validation).",
    )
    head_scores: str | None = _setting(
        None,
        "HeadKV: head-importance file (JSON from `python -m vllm_kvcompress.head_scores`, or a published "
        "HeadKV `\"layer-head\" -> [scores]` file), or `uniform` (every head equal = SnapKV). Required for `headkv`.",
    )
    headkv_beta: float = _setting(
        1.2,
        "HeadKV: the paper's beta > 1; each stream keeps `b - floor(b / beta)` and the rest is shared in "
        "proportion to the scores (b = budget - window).",
    )
    window_tokens: int = _setting(
        8,
        "SnapKV/HeadKV: the prompt's last tokens whose attention scores the rest (alpha); always kept.",
    )
    pool_kernel: int = _setting(
        7,
        "SnapKV/HeadKV: max-pooling kernel along positions (odd integer >= 1).",
    )
    page_tokens: int = _setting(
        16,
        "HeadKV/KVzap: rows per (layer, KV head) page; budgets are whole pages and memory is counted in pages "
        "(must divide the block size).",
    )
    kvzap_predictor: str | None = _setting(
        None,
        "KVzap: predictor file (safetensors from `python -m vllm_kvcompress.kvzap_train`) or a published "
        "`nvidia/KVzap-*` folder (config.json + model.safetensors). Required for `kvzap`.",
    )
    kvzap_threshold: float | None = _setting(
        None,
        "KVzap threshold mode: a token leaving the window is evicted for a KV head when its predicted "
        "log-score is below this (the paper: -4 for Qwen3-8B). Set this or a budget "
        "(`compression_ratio`/`max_kv_tokens`: top-k per KV head at the prompt end), not both.",
    )
    kvzap_window: int = _setting(
        128,
        "KVzap threshold mode: newest tokens never evicted (a multiple of `page_tokens`).",
    )
    dms_adapters: str | None = _setting(
        None,
        "DMS: decision adapters, a safetensors file from `python -m vllm_kvcompress.dms_train` or an official "
        "Model-Optimizer DMS checkpoint folder (adapter variant). Required for `dms`.",
    )
    dms_window: int | None = _setting(
        None,
        "DMS: a marked token stays visible for this many more tokens before its rows are freed (default: the "
        "window the checkpoint was trained with; a multiple of `page_tokens`).",
    )
    codebooks: str | None = _setting(
        None,
        "LOOKAT: codebook file from `python -m vllm_kvcompress.calibrate` (required for `lookat`; "
        "its m sets the codes per key).",
    )
    value_bits: int = _setting(
        16,
        "LOOKAT: value storage, 16 (model's bf16/fp16), 8 (int8) or 4 (int4), per-token per-head scales.",
    )
    current_tokens: str = _setting(
        "coded",
        "LOOKAT: `coded` reads the step's own tokens back from the coded cache (output independent of "
        "chunking and prefix caching); `exact` attends them with their exact keys/values.",
    )

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> "KVCompressConfig":
        raw = (additional_config or {}).get(CONFIG_KEY, {}) if isinstance(additional_config, dict) else {}
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: Any) -> "KVCompressConfig":
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise KVCompressConfigError(
                f"additional_config.{CONFIG_KEY} must be a JSON object, got {type(raw).__name__}"
            )
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise KVCompressConfigError(
                f"unknown key(s) {', '.join(_key(k) for k in unknown)}; allowed keys: {', '.join(known)}"
            )
        config = cls(**raw)
        config.validate()
        return config

    def validate(self) -> None:
        if not isinstance(self.method, str):
            raise KVCompressConfigError(
                f"{_key('method')} must be a string; allowed: {', '.join(AVAILABLE_METHODS)}"
            )
        if self.method not in AVAILABLE_METHODS:
            raise KVCompressConfigError(
                f"{_key('method')}: unknown method {self.method!r}; allowed: {', '.join(AVAILABLE_METHODS)}"
            )
        if self.max_kv_tokens is not None and (
            isinstance(self.max_kv_tokens, bool) or not isinstance(self.max_kv_tokens, int) or self.max_kv_tokens < 1
        ):
            raise KVCompressConfigError(
                f"{_key('max_kv_tokens')} must be an integer >= 1 (or null), got {self.max_kv_tokens!r}"
            )
        if self.compression_ratio is not None and (
            isinstance(self.compression_ratio, bool)
            or not isinstance(self.compression_ratio, (int, float))
            or not 0 <= self.compression_ratio < 1
        ):
            raise KVCompressConfigError(
                f"{_key('compression_ratio')} must be a number with 0 <= r < 1 (or null), "
                f"got {self.compression_ratio!r}"
            )
        if self.max_kv_tokens is not None and self.compression_ratio is not None:
            raise KVCompressConfigError(
                f"set at most one of {_key('max_kv_tokens')} and {_key('compression_ratio')}"
            )
        for name, minimum in (("sink_tokens", 0), ("recent_tokens", 0), ("buffer_blocks", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise KVCompressConfigError(f"{_key(name)} must be an integer >= {minimum}, got {value!r}")
        self._validate_lookat()
        self._validate_eviction()
        self._validate_window_methods()
        self._validate_kvzap()
        self._validate_dms()
        has_budget = self.max_kv_tokens is not None or self.compression_ratio is not None
        if has_budget and self.method not in EVICTION_METHODS:
            raise KVCompressConfigError(
                f"{_key('max_kv_tokens')}/{_key('compression_ratio')} apply to eviction methods "
                f"({', '.join(EVICTION_METHODS)}); method {self.method!r} keeps every token"
            )

    def _validate_eviction(self) -> None:
        if self.method in EVICTION_METHODS:
            if self.eviction_mode not in EVICTION_MODES:
                raise KVCompressConfigError(
                    f"{_key('eviction_mode')} must be one of {', '.join(EVICTION_MODES)}, got {self.eviction_mode!r}")
            if self.max_kv_tokens is None and self.compression_ratio is None and self.method not in PREDICTED_METHODS:
                raise KVCompressConfigError(
                    f"method {self.method!r} needs a budget: set {_key('compression_ratio')} (fraction of tokens "
                    f"removed, 0 <= r < 1) or {_key('max_kv_tokens')} (tokens kept per sequence)"
                )
            return
        for name, default in (("sink_tokens", 0), ("recent_tokens", 0), ("buffer_blocks", 1),
                              ("eviction_mode", "compact")):
            if getattr(self, name) != default:
                raise KVCompressConfigError(
                    f"{_key(name)} applies to eviction methods ({', '.join(EVICTION_METHODS)}) only "
                    f"(method is {self.method!r})"
                )

    def _validate_window_methods(self) -> None:
        defaults = {"head_scores": None, "headkv_beta": 1.2, "window_tokens": 8, "pool_kernel": 7, "page_tokens": 16}
        allowed = {"snapkv": ("window_tokens", "pool_kernel"), "headkv": tuple(defaults),
                   "kvzap": ("page_tokens",), "dms": ("page_tokens",)}.get(self.method, ())
        for name, default in defaults.items():
            if name not in allowed and getattr(self, name) != default:
                raise KVCompressConfigError(
                    f"{_key(name)} applies to method(s) {_methods_of(name)} "
                    f"only (method is {self.method!r})")
        if self.method not in (*WINDOW_METHODS, *PREDICTED_METHODS):
            return
        for name in ("sink_tokens", "recent_tokens", "buffer_blocks", "eviction_mode"):
            if getattr(self, name) != {"buffer_blocks": 1, "eviction_mode": "compact"}.get(name, 0):
                raise KVCompressConfigError(
                    f"{_key(name)} does not apply to {self.method!r}: it keeps its own window "
                    f"({_key({'kvzap': 'kvzap_window', 'dms': 'dms_window'}.get(self.method, 'window_tokens'))}) "
                    "and compacts per "
                    "(layer, KV head) stream")
        for name, minimum in (("window_tokens", 1), ("pool_kernel", 1), ("page_tokens", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise KVCompressConfigError(f"{_key(name)} must be an integer >= {minimum}, got {value!r}")
        if self.pool_kernel % 2 == 0:
            raise KVCompressConfigError(f"{_key('pool_kernel')} must be odd (same padding), got {self.pool_kernel}")
        if self.method != "headkv":
            return
        if not isinstance(self.head_scores, str) or not self.head_scores:
            raise KVCompressConfigError(
                f"{_key('head_scores')} is required for method 'headkv': a file from "
                "`python -m vllm_kvcompress.head_scores --model MODEL --out FILE`, a published HeadKV scores file, "
                "or \"uniform\"")
        beta = self.headkv_beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 1:
            raise KVCompressConfigError(f"{_key('headkv_beta')} must be a number > 1, got {beta!r}")

    def _validate_kvzap(self) -> None:
        if self.method != "kvzap":
            for name, default in (("kvzap_predictor", None), ("kvzap_threshold", None), ("kvzap_window", 128)):
                if getattr(self, name) != default:
                    raise KVCompressConfigError(f"{_key(name)} applies to method 'kvzap' only (method is {self.method!r})")
            return
        if not isinstance(self.kvzap_predictor, str) or not self.kvzap_predictor:
            raise KVCompressConfigError(
                f"{_key('kvzap_predictor')} is required for method 'kvzap': a file from "
                "`python -m vllm_kvcompress.kvzap_train --model MODEL --out DIR` or a published nvidia/KVzap-* folder")
        has_budget = self.max_kv_tokens is not None or self.compression_ratio is not None
        threshold = self.kvzap_threshold
        if (threshold is None) == (not has_budget):
            raise KVCompressConfigError(
                f"method 'kvzap' needs exactly one of {_key('kvzap_threshold')} (threshold mode, the paper's) or a "
                f"budget {_key('compression_ratio')}/{_key('max_kv_tokens')} (top-k per KV head at the prompt end)")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not math.isfinite(threshold)):
            raise KVCompressConfigError(f"{_key('kvzap_threshold')} must be a finite number (a log-score), "
                                        f"got {threshold!r}")
        self._check_window("kvzap_window")

    def _validate_dms(self) -> None:
        if self.method != "dms":
            for name in ("dms_adapters", "dms_window"):
                if getattr(self, name) is not None:
                    raise KVCompressConfigError(f"{_key(name)} applies to method 'dms' only (method is {self.method!r})")
            return
        if not isinstance(self.dms_adapters, str) or not self.dms_adapters:
            raise KVCompressConfigError(
                f"{_key('dms_adapters')} is required for method 'dms': a file from "
                "`python -m vllm_kvcompress.dms_train --model MODEL --out DIR` or an official DMS checkpoint folder")
        if self.max_kv_tokens is not None or self.compression_ratio is not None:
            raise KVCompressConfigError(
                f"method 'dms' takes no budget ({_key('compression_ratio')}/{_key('max_kv_tokens')}): the model's "
                "learned decisions set what is kept; pick a checkpoint trained for the ratio you want")
        if self.dms_window is not None:
            self._check_window("dms_window")

    def _check_window(self, name: str) -> None:
        window = getattr(self, name)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % self.page_tokens:
            raise KVCompressConfigError(f"{_key(name)} must be a positive multiple of "
                                        f"{_key('page_tokens')}={self.page_tokens}, got {window!r}")

    def _validate_lookat(self) -> None:
        if self.method != "lookat":
            for name, default in (("codebooks", None), ("value_bits", 16), ("current_tokens", "coded")):
                if getattr(self, name) != default:
                    raise KVCompressConfigError(f"{_key(name)} applies to method 'lookat' only (method is {self.method!r})")
            return
        if not isinstance(self.codebooks, str) or not self.codebooks:
            raise KVCompressConfigError(
                f"{_key('codebooks')} is required for method 'lookat': a file made by "
                "`python -m vllm_kvcompress.calibrate --model MODEL --out FILE`"
            )
        if isinstance(self.value_bits, bool) or self.value_bits not in VALUE_BITS:
            raise KVCompressConfigError(
                f"{_key('value_bits')} must be one of {', '.join(map(str, VALUE_BITS))}, got {self.value_bits!r}"
            )
        if self.current_tokens not in CURRENT_TOKENS:
            raise KVCompressConfigError(
                f"{_key('current_tokens')} must be one of {', '.join(CURRENT_TOKENS)}, got {self.current_tokens!r}"
            )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def reference_table() -> str:
    """Markdown table of every setting, for the README."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(KVCompressConfig):
        rows.append(f"| `{f.name}` | `{f.default!r}` | {f.metadata['doc']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(reference_table())
