"""What every compression method is made of, engine-neutral (no vLLM imports).

A method is one small class (:class:`Method`) with its own settings dataclass
(:class:`Settings`); the registry (:mod:`vllm_kvcompress.methods`) maps its name to it.
Settings are flat keys of ``additional_config["kvcompress"]``: each key is declared once,
with its default and its documentation, on the settings class that owns it; mixins share
a key between methods (:class:`BudgetSettings`, :class:`PagedSettings`).

The vLLM glue asks a method only these questions: how its cache rows are laid out
(:meth:`Method.cache_format`, :meth:`Method.row_bytes`), what it needs checked at
start-up (:meth:`Method.check_model`), the compression schedule of a request
(:meth:`Method.schedule`, eviction methods), what scores tokens (:meth:`Method.scorer`)
and, for learned methods, the forward hooks that score them (:meth:`Method.install`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from vllm_kvcompress.errors import KVCompressConfigError
from vllm_kvcompress.kernels import ops

# The learned methods' hooks run inside this profiler range: their share of a step, in a
# profile (benchmarks.gpu_engine --profile), where host timers see only kernel launches.
PREDICTOR_RANGE = "kvcompress_predictor"

CONFIG_KEY = "kvcompress"
# Compaction settings of the whole-row eviction (knorm); methods with a window of their own refuse them.
ROW_WINDOW_KEYS = ("sink_tokens", "recent_tokens", "buffer_blocks", "eviction_mode")


def key_name(name: str) -> str:
    return f"additional_config.{CONFIG_KEY}.{name}"


def setting(default, doc: str):
    """A settings field: its default and its documentation, stated once."""
    return field(default=default, metadata={"doc": doc})


def check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise KVCompressConfigError(f"{key_name(name)} must be an integer >= {minimum}, got {value!r}")


def check_number(name: str, value, condition, wanted: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not condition(value):
        raise KVCompressConfigError(f"{key_name(name)} must be {wanted}, got {value!r}")


def check_choice(name: str, value, allowed: tuple) -> None:
    if isinstance(value, bool) or value not in allowed:
        raise KVCompressConfigError(f"{key_name(name)} must be one of {', '.join(map(str, allowed))}, got {value!r}")


def check_path(name: str, value, method: str, how: str) -> None:
    if not isinstance(value, str) or not value:
        raise KVCompressConfigError(f"{key_name(name)} is required for method {method!r}: {how}")


@dataclass(frozen=True)
class Settings:
    """A method's settings; subclasses add fields with :func:`setting`."""

    def validate(self) -> None:
        pass


@dataclass(frozen=True)
class BudgetSettings(Settings):
    """Eviction methods that keep a budget of tokens per sequence."""

    max_kv_tokens: int | None = setting(
        None, "Eviction budget: tokens kept per sequence (integer >= 1; `headkv`: the average over "
              "(layer, KV head) streams).")
    compression_ratio: float | None = setting(
        None, "Eviction budget: fraction of tokens removed, 0 <= r < 1.")

    min_kv_tokens: int = setting(
        0, "Eviction: tokens a sequence always keeps, whatever the budget: prompts up to this length are not "
           "compressed (integer >= 0; with `compression_ratio`, short chat prompts keep every token).")

    BUDGET_KEYS: ClassVar[tuple[str, ...]] = ("max_kv_tokens", "compression_ratio")

    @staticmethod
    def check_budget(values: dict[str, Any]) -> None:
        """The budget keys' values, whichever method is selected (checked first)."""
        tokens, ratio = values.get("max_kv_tokens"), values.get("compression_ratio")
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise KVCompressConfigError(f"{key_name('max_kv_tokens')} must be an integer >= 1 (or null), got {tokens!r}")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1):
            raise KVCompressConfigError(
                f"{key_name('compression_ratio')} must be a number with 0 <= r < 1 (or null), got {ratio!r}")
        if tokens is not None and ratio is not None:
            raise KVCompressConfigError(f"set at most one of {key_name('max_kv_tokens')} and {key_name('compression_ratio')}")

    @property
    def has_budget(self) -> bool:
        return self.max_kv_tokens is not None or self.compression_ratio is not None

    def require_budget(self, method: str) -> None:
        if not self.has_budget:
            raise KVCompressConfigError(
                f"method {method!r} needs a budget: set {key_name('compression_ratio')} (fraction of tokens "
                f"removed, 0 <= r < 1) or {key_name('max_kv_tokens')} (tokens kept per sequence)")

    def validate(self) -> None:
        super().validate()
        self.check_budget(dataclasses.asdict(self))
        check_int("min_kv_tokens", self.min_kv_tokens, 0)
        if self.max_kv_tokens is not None and self.min_kv_tokens > self.max_kv_tokens:
            raise KVCompressConfigError(f"{key_name('min_kv_tokens')}={self.min_kv_tokens} is above "
                                        f"{key_name('max_kv_tokens')}={self.max_kv_tokens}: the budget would never bind")


@dataclass(frozen=True)
class PagedSettings(Settings):
    """Methods whose (layer, KV head) streams are paged in the shared pool."""

    page_tokens: int = setting(
        16, "Rows per (layer, KV head) page; budgets are whole pages and memory is counted in pages "
            "(must divide the block size).")

    def validate(self) -> None:
        super().validate()
        check_int("page_tokens", self.page_tokens, 1)

    def check_window(self, name: str) -> None:
        window = getattr(self, name)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % self.page_tokens:
            raise KVCompressConfigError(f"{key_name(name)} must be a positive multiple of "
                                        f"{key_name('page_tokens')}={self.page_tokens}, got {window!r}")


@dataclass(frozen=True)
class ModelShape:
    """What the methods need to know of the served model (whole model, every rank)."""

    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    hidden_size: int = 0
    rms_norm_eps: float = 1e-6

    @classmethod
    def of(cls, hf_config) -> "ModelShape":
        heads = hf_config.num_attention_heads
        return cls(hf_config.num_hidden_layers, heads, getattr(hf_config, "num_key_value_heads", heads),
                   getattr(hf_config, "hidden_size", 0), getattr(hf_config, "rms_norm_eps", 1e-6))


class DenseFormat:
    """bf16/fp16 ``[key | value]`` rows, vLLM's own page size (every method but LOOKAT)."""

    def __init__(self, head_dim: int, dtype):
        self.head_dim, self.dtype = head_dim, dtype

    def write(self, layer: int, cache, key, value, slots, positions=None) -> None:
        ops.dense_write(cache, key, value, slots)

    def to(self, device) -> None:
        """Nothing to move: every row lives in the cache."""

    def decode(self, layer: int, query, cache, block_table, kv_lens, scale, current=None, visible=None,
               max_kv_len=None):
        return ops.dense_decode(query, cache, block_table, kv_lens, scale, visible, max_kv_len)

    def prefill(self, layer: int, query, cache, blocks, kv_len, scale, current=None, visible=None):
        return ops.dense_prefill(query, cache, blocks, kv_len, scale, visible)

    def keys(self, layer: int, cache, blocks, length: int):
        """Cached keys ``[H, length, D]`` of one request, for eviction scores."""
        return ops.dense_gather(cache, blocks, length)[0]

    def keys_batch(self, layer: int, cache, block_table, length: int):
        """Cached keys ``[R, H, length, D]`` of ``R`` requests (rows past a request's own
        length are whatever its blocks hold), for a batched compaction."""
        return ops.dense_gather_batch(cache, block_table, length)[0]

    def key_norms(self, caches: list, block_table, length: int, layers: list[int]):
        """L2 norms ``[L, R, H, length]`` of the cached keys of ``R`` requests in the caches
        of ``layers`` (knorm's scores), without gathering the keys."""
        return ops.dense_key_norms(caches, block_table, length)


class Method:
    """One compression method. Class attributes describe it to the registry and the glue;
    an instance holds its validated settings."""

    name: ClassVar[str]
    Settings: ClassVar[type[Settings]] = Settings
    summary: ClassVar[str] = ""
    evicts: ClassVar[bool] = False  # evicts tokens: the plugin's scheduler and worker are wired in
    learned: ClassVar[bool] = False  # scores come from forward hooks on the model
    # Its hooks score through a custom op into persistent buffers, so compiled graphs (and
    # CUDA graphs) keep them: no eager mode needed. Read it on an instance: a method may decide
    # per artefact (DMS: a property, false for single-neuron checkpoints).
    compiled_scores: bool = False
    own_window: ClassVar[str | None] = None  # the key of the window it protects itself
    # Keeps every token at the model's precision in vLLM's page size: on CUDA, vLLM's own
    # FlashAttention can serve it unchanged (vllm/startup.py).
    passthrough: ClassVar[bool] = False
    # Its cache format needs each new token's RoPE position at write (the step metadata
    # computes them only then: a host op and a copy per step that other methods skip).
    needs_positions: ClassVar[bool] = False

    def __init__(self, settings: Settings):
        self.settings = settings

    # -- configuration ------------------------------------------------------------------
    @classmethod
    def foreign_key(cls, key: str, owners: list[str], evicting: list[str]) -> str:
        """Why ``key`` (owned by the methods ``owners``) cannot be set with this method."""
        if key in BudgetSettings.BUDGET_KEYS and not cls.evicts:
            return (f"{key_name('max_kv_tokens')}/{key_name('compression_ratio')} apply to eviction methods "
                    f"({', '.join(evicting)}); method {cls.name!r} keeps every token")
        if key in ROW_WINDOW_KEYS and cls.own_window:
            return (f"{key_name(key)} does not apply to {cls.name!r}: it keeps its own window "
                    f"({key_name(cls.own_window)}) and compacts per (layer, KV head) stream")
        if key in ROW_WINDOW_KEYS and not cls.evicts:
            return f"{key_name(key)} applies to eviction methods ({', '.join(evicting)}) only (method is {cls.name!r})"
        listed = f"method {owners[0]!r}" if len(owners) == 1 else f"method(s) {', '.join(owners)}"
        return f"{key_name(key)} applies to {listed} only (method is {cls.name!r})"

    # -- start-up -----------------------------------------------------------------------
    def check_model(self, shape: ModelShape, hf_config, block_size: int, tp_size: int) -> None:
        """Artefacts and layout against the served model; raises KVCompressConfigError."""

    def cuda_refusal(self) -> str | None:
        """Why these settings cannot run on CUDA (None: they can)."""
        return None

    # -- cache layout -------------------------------------------------------------------
    def row_bytes(self, head_dim: int, dtype) -> int | None:
        """Bytes of one (token, KV head) row; None = vLLM's own dense page."""
        return None

    def cache_format(self, hf_config, head_dim: int, dtype, heads: list[int] | None):
        return DenseFormat(head_dim, dtype)

    # -- eviction -----------------------------------------------------------------------
    def rule(self):
        """The :class:`~vllm_kvcompress.eviction.threshold.ThresholdRule` that decides
        survivors token by token, or None (budgets decide)."""
        return None

    def min_budget(self) -> int:
        """Rows a budget never goes below (rows the method always protects)."""
        return 0

    def schedule(self, prompt_len: int, budget: int | None, streams):
        """The request's compression schedule, or None (keep everything)."""
        return None

    masks: bool = False  # eviction as the masked reference (rows hidden, none freed)

    def protected(self) -> tuple[int, int]:
        """(first, last) rows of a sequence that every whole-row compaction keeps."""
        return 0, 0

    def scorer(self):
        """Scores rows from their keys (higher = keep); None = scores stored per pool row."""
        return None

    def install(self, model, shape: ModelShape, heads: list[int] | None, tp_size: int, device, record,
                max_tokens: int | None = None):
        """Learned methods: hook the model so each layer's step scores reach ``record(layer, scores,
        seconds)``, or (:attr:`compiled_scores`) land in per-layer buffers of ``max_tokens`` rows
        (``record(layer, None, seconds)`` then). Returns a :class:`LearnedScores`."""
        raise NotImplementedError(f"method {self.name!r} has no learned scores")


@dataclass
class LearnedScores:
    """What a learned method's hooks leave for the attention: handles, and an optional
    change to the query (DMS single-neuron zeroes its decision channel after RoPE too)."""

    handles: list
    adjust_query: Any = None
    score_buffers: list | None = None  # compiled_scores: per layer [max_tokens, KV heads], a step's scores first
    scores_install: int | None = None  # compiled_scores: the install to activate before each step (buffered_scores)


def floor_budget(prompt_len: int, tokens: int | None, ratio: float | None, minimum: int) -> int | None:
    """Rows kept per sequence from a token budget or a ratio; None = keep everything."""
    if tokens is not None:
        budget = int(tokens)
    elif ratio is not None:
        if ratio == 0:
            return None
        # kvpress keeps int(n * (1 - ratio)); the epsilon keeps 1000 * (1 - 0.9) at 100, not 99.
        budget = math.floor(prompt_len * (1 - float(ratio)) + 1e-9)
    else:
        return None
    return max(budget, minimum, 1)
