"""Presets: ``{"kvcompress": {"preset": "safe" | "balanced" | "max"}}`` stands for a measured
configuration, expanded at start-up against the served model and logged, so what runs is
always visible (``vllm_kvcompress.vllm.startup``; every engine process then reads the
expanded settings).

Each preset is a composition of ``kvquant`` rows (pre-RoPE integer keys and quantized
values, every byte counted in vLLM's page) under ``snapkv`` eviction at the prompt end.
They need the model's key ranges: shipped for the project's models
(``artefacts/key_ranges/``, found by the model's signature); for another model, make them
with ``python -m vllm_kvcompress.offline.key_ranges`` and pass ``key_ranges`` with the
preset. How each preset was measured: docs/presets.md.
"""

from __future__ import annotations

from pathlib import Path

from vllm_kvcompress.errors import KVCompressConfigError
from vllm_kvcompress.methods.base import key_name

# Prompts up to this many tokens are not evicted (a chat turn keeps every token; the rows are
# still compact); the ratios bind from 1,138 (safe) and 2,560 (balanced, max) prompt tokens.
SHORT_PROMPT = 512
# SnapKV scores the prompt with its last 32 queries: behind a chat template the last 8 are the
# template's own tokens and "Answer:", which never see the question.
WINDOW = 32
PRESETS: dict[str, dict] = {
    # ~4.2x: int8 keys and values (rows of 134 bytes at head_dim 64 vs 256) x 45% of the prompt kept
    "safe": {"method": "kvquant+snapkv", "key_bits": 8, "value_bits": 8, "compression_ratio": 0.55,
             "window_tokens": WINDOW, "min_kv_tokens": SHORT_PROMPT},
    # ~9.5x: int8 keys and values x 20% of the prompt kept
    "balanced": {"method": "kvquant+snapkv", "key_bits": 8, "value_bits": 8, "compression_ratio": 0.8,
                 "window_tokens": WINDOW, "min_kv_tokens": SHORT_PROMPT},
    # ~18x: int4 keys and values (72-byte rows) x 20% of the prompt kept
    "max": {"method": "kvquant+snapkv", "key_bits": 4, "value_bits": 4, "compression_ratio": 0.8,
            "window_tokens": WINDOW, "min_kv_tokens": SHORT_PROMPT},
}
# What a user may set beside a preset: the model's artefact, nothing that changes what was measured.
WITH_PRESET = ("preset", "key_ranges")
SHIPPED_RANGES = Path(__file__).resolve().parent / "artefacts" / "key_ranges"


def shipped_key_ranges(hf_config) -> str | None:
    """The shipped range file made for this checkpoint, or None. Both the name (the
    folder ``vllm_kvcompress.offline.models`` converts it to) and the shape must match: a
    fine-tune of the same shape (an Instruct or base sibling) has other key ranges."""
    from safetensors import safe_open

    from vllm_kvcompress.methods.artefacts import model_signature

    want = model_signature(hf_config)
    name = Path(str(getattr(hf_config, "name_or_path", "") or "")).name.lower()
    for path in sorted(SHIPPED_RANGES.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("model") == name and all(metadata.get(k) == v for k, v in want.items()):
            return str(path)
    return None


def expand(raw: dict, hf_config) -> dict:
    """The settings a preset stands for (``raw`` without ``preset``: unchanged)."""
    if "preset" not in raw:
        return raw
    name = raw["preset"]
    if not isinstance(name, str) or name not in PRESETS:
        raise KVCompressConfigError(f"{key_name('preset')} must be one of {', '.join(PRESETS)}, got {name!r}")
    extra = sorted(set(raw) - set(WITH_PRESET))
    if extra:
        raise KVCompressConfigError(
            f"{key_name('preset')} {name!r} cannot be combined with {', '.join(key_name(k) for k in extra)}: a preset "
            f"is a measured configuration (only {key_name('key_ranges')} may be given with it); to change it, set "
            f"its expansion yourself: {PRESETS[name]}")
    ranges = raw.get("key_ranges") or shipped_key_ranges(hf_config)
    if ranges is None:
        arch = (getattr(hf_config, "architectures", None) or ["?"])[0]
        raise KVCompressConfigError(
            f"{key_name('preset')} {name!r} needs the pre-RoPE key ranges of this model ({arch}, "
            f"{hf_config.num_hidden_layers} layers, {getattr(hf_config, 'name_or_path', '?')}); none is shipped for it "
            f"(shipped: {', '.join(p.stem for p in sorted(SHIPPED_RANGES.glob('*.safetensors')))}). Make them once with "
            f"`python -m vllm_kvcompress.offline.key_ranges --model MODEL --out FILE` and pass "
            f"{key_name('key_ranges')}=FILE with the preset")
    return {**PRESETS[name], "key_ranges": ranges}


def describe(name: str, settings: dict) -> str:
    return f"kvcompress preset {name!r} = {settings}"
