"""The registry: every compression method by its ``method`` name. Adding a method = one
module with a :class:`~vllm_kvcompress.methods.base.Method` subclass and its settings
dataclass, plus one line here. ``FORMAT+EVICTION`` names compose two of them
(:mod:`.composition`)."""

from __future__ import annotations

from vllm_kvcompress.methods import composition
from vllm_kvcompress.methods.base import Method
from vllm_kvcompress.methods.dms import DMS
from vllm_kvcompress.methods.headkv import HeadKV
from vllm_kvcompress.methods.knorm import Knorm
from vllm_kvcompress.methods.kvquant import KVQuant
from vllm_kvcompress.methods.kvzap import KVzap
from vllm_kvcompress.methods.lookat import Lookat
from vllm_kvcompress.methods.none import NoCompression
from vllm_kvcompress.methods.snapkv import SnapKV

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (
    NoCompression,
    Lookat,
    KVQuant,
    Knorm,
    SnapKV,
    HeadKV,
    KVzap,
    DMS,
)}


def evicting() -> list[str]:
    """The methods that evict tokens (and free blocks)."""
    return [name for name, cls in METHODS.items() if cls.evicts]


def method_class(name: str) -> type[Method]:
    """A registered method or a composition (``kvquant+snapkv``); KVCompressConfigError names
    what is allowed."""
    if name in METHODS:
        return METHODS[name]
    if composition.split(name) is None:
        from vllm_kvcompress.errors import KVCompressConfigError
        from vllm_kvcompress.methods.base import key_name

        raise KVCompressConfigError(
            f"{key_name('method')}: unknown method {name!r}; allowed: {composition.allowed(METHODS)}")
    return composition.compose(METHODS, name)
