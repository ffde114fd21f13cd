"""The plugin's settings: ``additional_config["kvcompress"]`` (``--additional-config
'{"kvcompress": {...}}'``) parsed once into a :class:`KVCompressConfig`: the method's
name and its own validated settings dataclass (:mod:`vllm_kvcompress.methods`).

Keys stay flat for users; each belongs to the settings of the methods that use it. A
key of another method is refused unless it holds its default. Every error names the key
and the allowed values, and is raised in the front-end process before any engine
process starts.

    python -m vllm_kvcompress.config     # the reference table of every key
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import Any

from vllm_kvcompress.errors import KVCompressConfigError
from vllm_kvcompress.methods import METHODS, evicting, method_class
from vllm_kvcompress.methods.base import CONFIG_KEY, BudgetSettings, Method, PagedSettings, Settings, key_name

__all__ = ["CONFIG_KEY", "KVCompressConfig", "KVCompressConfigError", "reference_table"]

METHOD_DOC = ("Compression method: " + "; ".join(f"`{name}` {cls.summary}" for name, cls in METHODS.items())
              + " (eviction methods other than `kvzap` threshold mode and `dms` need a budget).")


def _keys() -> dict[str, list[tuple[str, dataclasses.Field]]]:
    """Every settings key -> the (method, field) pairs that declare it, budget keys first."""
    keys: dict[str, list] = {name: [] for name in BudgetSettings.BUDGET_KEYS}
    for name, cls in METHODS.items():
        for f in dataclasses.fields(cls.Settings):
            keys.setdefault(f.name, []).append((name, f))
    return keys


@dataclass(frozen=True)
class KVCompressConfig:
    method: str = "none"
    settings: Settings = Settings()

    @property
    def spec(self) -> type[Method]:
        return method_class(self.method)

    def build(self) -> Method:
        """The method object (one per process and user: it may cache loaded artefacts)."""
        return self.spec(self.settings)

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> "KVCompressConfig":
        raw = (additional_config or {}).get(CONFIG_KEY, {}) if isinstance(additional_config, dict) else {}
        try:
            canonical = json.dumps(raw, sort_keys=True)
        except (TypeError, ValueError):
            return cls.from_dict(raw)
        return _parsed(canonical)

    @classmethod
    def from_dict(cls, raw: Any) -> "KVCompressConfig":
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise KVCompressConfigError(f"additional_config.{CONFIG_KEY} must be a JSON object, got {type(raw).__name__}")
        if "preset" in raw:
            raise KVCompressConfigError(
                f"{key_name('preset')} stands for settings chosen for the served model: it is expanded at start-up "
                "(vllm_kvcompress.presets.expand), before these settings are parsed")
        keys = _keys()
        known = ["method", *keys]
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise KVCompressConfigError(
                f"unknown key(s) {', '.join(key_name(k) for k in unknown)}; allowed keys: {', '.join(known)}")
        method = raw.get("method", "none")
        if not isinstance(method, str):
            raise KVCompressConfigError(f"{key_name('method')} must be a string; allowed: {', '.join(METHODS)}")
        spec = method_class(method)
        BudgetSettings.check_budget(raw)
        own = {f.name for f in dataclasses.fields(spec.Settings)}
        for key, value in raw.items():
            if key == "method" or key in own:
                continue
            owners = keys[key]
            if value != owners[0][1].default:
                raise KVCompressConfigError(spec.foreign_key(key, [name for name, _ in owners], evicting()))
        settings = spec.Settings(**{k: v for k, v in raw.items() if k in own})
        settings.validate()
        return cls(method, settings)

    @property
    def whole_row_eviction(self) -> bool:
        """Evicts whole (token, all KV heads) rows from vLLM's own pages by a scorer (knorm,
        snapkv, and compositions over them): no per-head streams, no learned hooks."""
        spec = self.spec
        return spec.evicts and not spec.learned and not isinstance(self.settings, PagedSettings)

    @property
    def budget_streams(self) -> bool:
        """Per-(layer, KV head) streams under budgets (HeadKV): every stream's pages are a pure
        function of the logical length, as whole-row eviction's rows are (no worker report)."""
        return self.spec.evicts and isinstance(self.settings, PagedSettings) and self.build().rule() is None

    @property
    def takes_request_budget(self) -> bool:
        """Whether requests may set their own budget: an eviction method that keeps a
        budget (not one whose threshold rule decides)."""
        return self.spec.evicts and isinstance(self.settings, BudgetSettings) and self.build().rule() is None

    def with_budget(self, overrides: dict[str, Any]) -> "KVCompressConfig":
        """These settings with a request's own budget (``compression_ratio``/``max_kv_tokens``)."""
        if not isinstance(self.settings, BudgetSettings):
            key = next(iter(overrides))
            raise KVCompressConfigError(self.spec.foreign_key(key, [name for name, _ in _keys()[key]], evicting()))
        BudgetSettings.check_budget(overrides)
        settings = dataclasses.replace(self.settings, **{"max_kv_tokens": None, "compression_ratio": None, **overrides})
        settings.validate()
        return KVCompressConfig(self.method, settings)

    def as_dict(self) -> dict[str, Any]:
        """The flat form (what users write), with every default filled in."""
        return {"method": self.method, **dataclasses.asdict(self.settings)}


@functools.lru_cache(maxsize=16)
def _parsed(canonical: str) -> KVCompressConfig:
    """Each process parses a given setting once (the config is immutable)."""
    return KVCompressConfig.from_dict(json.loads(canonical))


def reference_table() -> str:
    """Markdown table of every setting, for the docs."""
    rows = ["| key | default | methods | meaning |", "|---|---|---|---|",
            f"| `method` | `'none'` | all | {METHOD_DOC} |",
            "| `preset` | `None` | all | `safe`, `balanced` or `max`: a measured composition, expanded at start-up for "
            "the served model and logged (docs/presets.md); only `key_ranges` may be given with it. |"]
    for key, owners in _keys().items():
        f = owners[0][1]
        defaults = {repr(field.default) for _, field in owners}
        default = f"`{f.default!r}`" if len(defaults) == 1 else ", ".join(
            f"`{field.default!r}` ({name})" for name, field in owners)
        docs = list(dict.fromkeys(field.metadata["doc"] for _, field in owners))
        rows.append(f"| `{key}` | {default} | {', '.join(name for name, _ in owners)} | {' '.join(docs)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(reference_table())
