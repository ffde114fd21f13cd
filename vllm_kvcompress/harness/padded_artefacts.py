"""SmolLM2's artefacts for its padded twin (``smollm2-135m-gqa4``: one more, inert KV
head and its query group, see :func:`vllm_kvcompress.offline.models.ensure_padded_model`), so
that TP=2 runs use the shipped predictors, adapters, head scores and codebooks. The
extra head's entries copy the last real head's."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

OLD_KV, NEW_KV, GROUP = 3, 4, 3


def _pad_heads(tensor: torch.Tensor) -> torch.Tensor:
    return torch.cat([tensor, tensor[-1:]]) if tensor.shape[0] == OLD_KV else tensor


def pad_safetensors(path: str | Path, out: Path) -> str:
    """Predictors, DMS adapters, codebooks: every per-KV-head tensor gets a 4th head."""
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {key: _pad_heads(f.get_tensor(key)) for key in f.keys()}
    metadata["num_kv_heads"] = str(NEW_KV)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out), metadata=metadata)
    return str(out)


def pad_head_scores(path: str | Path, out: Path) -> str:
    raw = json.loads(Path(path).read_text())
    raw["scores"] = [row + row[-GROUP:] for row in raw["scores"]]
    raw.update(num_attention_heads=NEW_KV * GROUP, num_kv_heads=NEW_KV)
    out.write_text(json.dumps(raw))
    return str(out)
