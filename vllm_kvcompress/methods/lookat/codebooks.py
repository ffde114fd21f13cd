"""LOOKAT codebook files: safetensors with one ``layer.N`` tensor ``[kv_heads, m, K,
head_dim / m]`` per layer (optionally ``subspace_dims``), and metadata the engine checks
against the model it serves. Written by :mod:`vllm_kvcompress.offline.calibrate`."""

from __future__ import annotations

from pathlib import Path

import torch

# /2: rope_theta read from transformers 5's rope_parameters (/1 files recorded 0.0);
# position-augmented calibration.
FORMAT = "kvcompress-pq-codebooks/2"


def model_signature(config) -> dict[str, str]:
    """What a codebook file must agree with (string values: safetensors metadata)."""
    heads = config.num_attention_heads
    return {
        "architecture": (config.architectures or ["?"])[0],
        "num_layers": str(config.num_hidden_layers),
        "num_kv_heads": str(getattr(config, "num_key_value_heads", heads)),
        "head_dim": str(getattr(config, "head_dim", None) or config.hidden_size // heads),
        "rope_theta": str(rope_theta(config)),
    }


def rope_theta(config) -> float:
    """The RoPE base of a transformers config (``rope_parameters`` in transformers 5)."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta) if theta is not None else 0.0


class CodebookMismatch(ValueError):
    pass


def check_codebook_file(path: str, config) -> dict:
    """The file's metadata, refusing a missing file, another format, or another model."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise CodebookMismatch(f"codebook file {path} does not exist; make one with "
                               f"`python -m vllm_kvcompress.offline.calibrate --model MODEL --out {path}`")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error type for a damaged header
        raise CodebookMismatch(f"{path}: not a readable safetensors file ({exc})") from None
    if metadata.get("format") != FORMAT:
        raise CodebookMismatch(f"{path}: not a kvcompress codebook file (format {metadata.get('format')!r}, expected {FORMAT!r})")
    expected = model_signature(config)
    wrong = {key: (metadata.get(key), value) for key, value in expected.items() if metadata.get(key) != value}
    if wrong:
        details = "; ".join(f"{key}: file has {have}, model has {want}" for key, (have, want) in wrong.items())
        raise CodebookMismatch(f"{path} was calibrated for another model ({details}); "
                               f"run `python -m vllm_kvcompress.offline.calibrate` for this model")
    return metadata


def load_codebooks(path: str, config) -> tuple[list[torch.Tensor], dict, torch.Tensor | None]:
    """Per-layer codebooks ``[Hkv, m, K, s]`` (fp32), metadata, and the subspace
    dimension map ``[m, s]`` (None = contiguous subspaces)."""
    from safetensors import safe_open

    metadata = check_codebook_file(path, config)
    with safe_open(path, framework="pt") as f:
        layers = [f.get_tensor(f"layer.{i}").float() for i in range(int(metadata["num_layers"]))]
        dims = f.get_tensor("subspace_dims").long() if "subspace_dims" in f.keys() else None
    return layers, metadata, dims
