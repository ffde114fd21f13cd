"""Artefact files made for one model (LOOKAT codebooks, kvquant key ranges): the model
signature they record, and the one check every loader runs on them before an engine starts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def rope_theta(config) -> float:
    """The RoPE base of a transformers config (``rope_parameters`` in transformers 5)."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta) if theta is not None else 0.0


def model_signature(config) -> dict[str, str]:
    """What an artefact file must agree with (string values: safetensors metadata)."""
    heads = config.num_attention_heads
    return {
        "architecture": (config.architectures or ["?"])[0],
        "num_layers": str(config.num_hidden_layers),
        "num_kv_heads": str(getattr(config, "num_key_value_heads", heads)),
        "head_dim": str(getattr(config, "head_dim", None) or config.hidden_size // heads),
        "rope_theta": str(rope_theta(config)),
    }


def check_artefact(path: str, config, file_format: str, kind: str, command: str,
                   error: Callable[[str], Exception]) -> dict:
    """The metadata of the safetensors file at ``path``, refusing (raising ``error(message)``) a missing
    or unreadable file, another ``file_format``, or a file made for another model than
    ``config``; ``command`` (``python -m ...``) makes one for this model."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise error(f"{kind} {path} does not exist; make one with `{command} --model MODEL --out {path}`")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error type for a damaged header
        raise error(f"{path} is not a readable safetensors file ({exc})") from None
    if metadata.get("format") != file_format:
        raise error(f"{path} is not a {kind} (format {metadata.get('format')!r}, expected {file_format!r})")
    wrong = {key: (metadata.get(key), value) for key, value in model_signature(config).items()
             if metadata.get(key) != value}
    if wrong:
        details = "; ".join(f"{key}: file has {have}, model has {want}" for key, (have, want) in wrong.items())
        raise error(f"{kind} {path} was made for another model ({details}); run `{command}` for this model")
    return metadata
