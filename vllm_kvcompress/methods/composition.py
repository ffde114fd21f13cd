"""Compositions: a compact row format (``lookat`` PQ keys or ``kvquant`` integer keys, each
with its 16/8/4-bit values) under an eviction method, named ``FORMAT+EVICTION``, e.g.
``{"method": "kvquant+snapkv", "compression_ratio": 0.5}``. Whole-row eviction (``knorm``,
``snapkv``) takes either format; the per-(layer, KV head) stream methods (``headkv``,
``kvzap``, ``dms``) take ``kvquant`` rows, which their stream attention decodes as it
gathers them (CPU build).

The row format makes each (token, KV head) row smaller, so vLLM's page holds more rows;
the eviction method keeps fewer rows and hands emptied blocks back to vLLM's pool. The
savings multiply in vLLM's own block accounting. The composition takes the eviction
method's schedule, scorer and budget, and the format method's row layout and artefact
checks; the settings of both are accepted, each validated by its owner.

Refused, with the reason: two formats or two eviction methods; ``lookat`` under the stream
methods (LOOKAT's keys are read through per-query lookup tables, which the stream attention
does not build); knorm's ``eviction_mode: mask`` (the formats read rows without a visibility
mask); stream compositions on CUDA (no stream kernel reads kvquant rows yet).
"""

from __future__ import annotations

import dataclasses
import functools

from vllm_kvcompress.methods.base import KVCompressConfigError, Method, PagedSettings, key_name

FORMATS = ("lookat", "kvquant")
ROW_EVICTIONS = ("knorm", "snapkv")
STREAM_EVICTIONS = ("headkv", "kvzap", "dms")
STREAM_FORMATS = ("kvquant",)  # formats the stream attention decodes


def allowed(methods) -> str:
    """What ``method`` may name, for the errors."""
    return (f"{', '.join(methods)}, or FORMAT+EVICTION with FORMAT in {', '.join(FORMATS)} and EVICTION in "
            f"{', '.join(ROW_EVICTIONS)} (kvquant also: {', '.join(STREAM_EVICTIONS)})")


def split(name: str) -> tuple[str, str] | None:
    """``"kvquant+snapkv"`` -> ("kvquant", "snapkv"); None for a single method's name."""
    if "+" not in name:
        return None
    parts = name.split("+")
    if len(parts) != 2 or not all(parts):
        raise KVCompressConfigError(f"{key_name('method')}: {name!r} must be FORMAT+EVICTION, e.g. kvquant+snapkv "
                                    f"(formats: {', '.join(FORMATS)}; eviction: {', '.join(ROW_EVICTIONS)})")
    return parts[0], parts[1]


def compose(methods: dict[str, type[Method]], name: str) -> type[Method]:
    """The method class of a composition name, or a KVCompressConfigError naming what is allowed."""
    fmt, evict = split(name)
    for part in (fmt, evict):
        if part not in methods:
            raise KVCompressConfigError(f"{key_name('method')}: unknown method {part!r} in {name!r}; allowed: "
                                        f"{allowed(methods)}")
    if fmt not in FORMATS:
        raise KVCompressConfigError(f"{key_name('method')}: {name!r}: the first part must be a row format "
                                    f"({', '.join(FORMATS)}), got {fmt!r}")
    if evict in FORMATS or not methods[evict].evicts:
        raise KVCompressConfigError(f"{key_name('method')}: {name!r}: the second part must be an eviction method "
                                    f"({', '.join(ROW_EVICTIONS + STREAM_EVICTIONS)}), got {evict!r}")
    if issubclass(methods[evict].Settings, PagedSettings) and fmt not in STREAM_FORMATS:
        raise KVCompressConfigError(
            f"{key_name('method')}: {name!r} is not supported: {evict!r} keeps per-(layer, KV head) streams, whose "
            f"attention decodes {', '.join(STREAM_FORMATS)} rows but builds no {fmt!r} lookup tables; compose "
            f"{fmt!r} with {' or '.join(ROW_EVICTIONS)}, or use {', '.join(f'{f}+{evict}' for f in STREAM_FORMATS)}")
    return _composed(methods[fmt], methods[evict])


@functools.lru_cache(maxsize=None)
def _composed(fmt: type[Method], evict: type[Method]) -> type[Method]:
    name = f"{fmt.name}+{evict.name}"

    def validate(self) -> None:
        evict.Settings.validate(self)
        fmt.Settings.validate(self)
        if getattr(self, "eviction_mode", "compact") != "compact":
            raise KVCompressConfigError(f"{key_name('eviction_mode')} must be 'compact' with method {name!r}: "
                                        f"{fmt.name!r} rows are read without a visibility mask")

    settings = dataclasses.make_dataclass(f"{fmt.__name__}{evict.__name__}Settings", [],
                                          bases=(evict.Settings, fmt.Settings), frozen=True,
                                          namespace={"validate": validate})

    class Composed(evict):
        """``evict``'s eviction over ``fmt``'s rows."""

        Settings = settings
        needs_positions = fmt.needs_positions

        def __init__(self, values):
            super().__init__(values)
            self.rows = fmt(values)
            if hasattr(self.rows, "stores_positions"):
                self.rows.stores_positions = True  # compaction makes a row's index physical

        def check_model(self, shape, hf_config, block_size, tp_size) -> None:
            super().check_model(shape, hf_config, block_size, tp_size)
            self.rows.check_model(shape, hf_config, block_size, tp_size)

        def cuda_refusal(self) -> str | None:
            if issubclass(evict.Settings, PagedSettings):
                return (f"{fmt.name!r} rows under {evict.name!r}'s per-(layer, KV head) streams run on the CPU build "
                        f"only: no stream kernel reads {fmt.name!r} rows yet")
            return self.rows.cuda_refusal() or super().cuda_refusal()

        def row_bytes(self, head_dim: int, dtype) -> int | None:
            return self.rows.row_bytes(head_dim, dtype)

        def cache_format(self, hf_config, head_dim, dtype, heads):
            return self.rows.cache_format(hf_config, head_dim, dtype, heads)

    Composed.name = name
    Composed.summary = f"{fmt.summary}, and {evict.summary}"
    Composed.__name__ = Composed.__qualname__ = f"{fmt.__name__}{evict.__name__}"
    return Composed
