"""LOOKAT codebook files: safetensors with one ``layer.N`` tensor ``[kv_heads, m, K,
head_dim / m]`` per layer (optionally ``subspace_dims``), and metadata the engine checks
against the model it serves. Written by :mod:`vllm_kvcompress.offline.calibrate`."""

from __future__ import annotations

import torch

from vllm_kvcompress.methods.artefacts import check_artefact

# /2: rope_theta read from transformers 5's rope_parameters (/1 files recorded 0.0);
# position-augmented calibration.
FORMAT = "kvcompress-pq-codebooks/2"


class CodebookMismatch(ValueError):
    pass


def check_codebook_file(path: str, config) -> dict:
    """The file's metadata, refusing a missing file, another format, or another model."""
    return check_artefact(path, config, FORMAT, "codebook file", "python -m vllm_kvcompress.offline.calibrate",
                          CodebookMismatch)


def load_codebooks(path: str, config) -> tuple[list[torch.Tensor], dict, torch.Tensor | None]:
    """Per-layer codebooks ``[Hkv, m, K, s]`` (fp32), metadata, and the subspace
    dimension map ``[m, s]`` (None = contiguous subspaces)."""
    from safetensors import safe_open

    metadata = check_codebook_file(path, config)
    with safe_open(path, framework="pt") as f:
        layers = [f.get_tensor(f"layer.{i}").float() for i in range(int(metadata["num_layers"]))]
        dims = f.get_tensor("subspace_dims").long() if "subspace_dims" in f.keys() else None
    return layers, metadata, dims
