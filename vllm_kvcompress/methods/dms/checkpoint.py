"""DMS decision heads from disk, in either of two formats, checked against the model:

* a file from ``python -m vllm_kvcompress.offline.dms_train`` (safetensors, metadata
  ``format = kvcompress-dms/1``; tensors ``layers.<i>.norm.weight``, ``layers.<i>.proj.{weight,bias}``);
* an official NVIDIA Model-Optimizer DMS checkpoint folder (``config.json`` with the
  ``dms_*`` keys). The adapter variant (``dms_separate_alpha: true``) has its tensors
  ``model.layers.<i>.self_attn.dms_proj_alpha_norm.weight`` and ``...dms_proj_alpha.weight``
  [+ ``.bias``] inside the model's safetensors shards; the single-neuron variant has none:
  its fine-tuned model decides from the last channel of the first query head of each GQA
  group, so that folder must be the model being served.

Safetensors and JSON only: nothing is unpickled.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_kvcompress.methods.dms.decisions import ALPHA_OFFSET, ALPHA_SCALE, DMSAdapter

FORMAT = "kvcompress-dms/1"
_OFFICIAL = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.dms_proj_alpha(_norm)?\.(weight|bias)$")


class DMSCheckpointError(ValueError):
    """A DMS checkpoint that cannot be used with this model; the message says why."""


@dataclass
class DMSDecisions:
    adapters: list[DMSAdapter]  # one per layer: residual stream [T, hidden] -> logits [T, KV heads]
    window: int  # the window the checkpoint was trained with
    per_layer: bool  # official ``dms_alpha_per: layer``: KV head 0 decides for every head
    source: str
    single_neuron: bool = False  # decisions from the query channel (no adapters)
    scale: float = ALPHA_SCALE
    offset: float = ALPHA_OFFSET
    heads: list[int] | None = None  # tensor parallelism: the KV heads this rank keeps scores for


def checkpoint_window(path: str) -> int:
    """The training window recorded in a checkpoint (header/config only; cheap)."""
    p = Path(path)
    if p.is_dir():
        return int(_official_config(p).get("dms_window_size", 512))
    return int(_metadata(p)["window"])


def checkpoint_single_neuron(path: str) -> bool:
    """Whether a checkpoint decides from the query channel (header/config only; cheap)."""
    p = Path(path)
    return p.is_dir() and not _official_config(p).get("dms_separate_alpha", False)


def load_decisions(path: str, num_layers: int, hidden: int, kv_heads: int, eps: float = 1e-6) -> DMSDecisions:
    p = Path(path)
    if p.is_dir():
        return _load_official(p, num_layers, hidden, kv_heads, eps)
    meta = _metadata(p)
    for key, want in (("num_layers", num_layers), ("hidden_size", hidden), ("num_kv_heads", kv_heads)):
        if int(meta.get(key, -1)) != want:
            raise DMSCheckpointError(f"{p}: trained for {key}={meta.get(key)}, the model has {want}")
    from safetensors.torch import load_file

    tensors = load_file(str(p))
    adapters = []
    for layer in range(num_layers):
        adapter = DMSAdapter(hidden, kv_heads, eps)
        state = {k[len(f"layers.{layer}."):]: v for k, v in tensors.items() if k.startswith(f"layers.{layer}.")}
        _load_state(adapter, state, f"{p} layer {layer}")
        adapters.append(adapter.eval())
    return DMSDecisions(adapters, int(meta["window"]), False, str(p))


def _metadata(p: Path) -> dict:
    if not p.is_file():
        raise DMSCheckpointError(f"{p}: no such file (expected a safetensors file from "
                                 "`python -m vllm_kvcompress.offline.dms_train` or an official DMS checkpoint folder)")
    from safetensors import safe_open

    try:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for a corrupt header
        raise DMSCheckpointError(f"{p}: not a readable safetensors file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise DMSCheckpointError(f"{p}: metadata format is {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def _official_config(p: Path) -> dict:
    config_path = p / "config.json"
    if not config_path.is_file():
        raise DMSCheckpointError(f"{p}: a DMS checkpoint folder needs config.json with the dms_* keys")
    config = json.loads(config_path.read_text())
    if not any(k.startswith("dms_") for k in config):
        raise DMSCheckpointError(f"{config_path}: no dms_* keys; not a DMS checkpoint")
    return config


def _load_official(p: Path, num_layers: int, hidden: int, kv_heads: int, eps: float) -> DMSDecisions:
    config = _official_config(p)
    if config.get("dms_disable_eviction", False):
        raise DMSCheckpointError(f"{p}: dms_disable_eviction is true (the checkpoint asks for no eviction); "
                                 "serve it without kvcompress")
    per = config.get("dms_alpha_per", "head")
    if per not in ("head", "layer"):
        raise DMSCheckpointError(f"{p}: dms_alpha_per={per!r}; allowed: head, layer")
    for key, want in (("num_hidden_layers", num_layers), ("hidden_size", hidden), ("num_key_value_heads", kv_heads)):
        if key in config and int(config[key]) != want:
            raise DMSCheckpointError(f"{p}: checkpoint has {key}={config[key]}, the model has {want}")
    scale = float(config.get("dms_alpha_scale", ALPHA_SCALE))
    offset = float(config.get("dms_initial_alpha_offset", ALPHA_OFFSET))
    window = int(config.get("dms_window_size", 512))
    if not config.get("dms_separate_alpha", False):
        return DMSDecisions([], window, per == "layer", str(p), single_neuron=True, scale=scale, offset=offset)
    tensors = _official_tensors(p)
    eps = float(config.get("rms_norm_eps", eps))
    adapters = []
    for layer in range(num_layers):
        found = tensors.get(layer, {})
        state = {"norm.weight": found.get("norm.weight"), "proj.weight": found.get("proj.weight"),
                 "proj.bias": found.get("proj.bias", torch.zeros(kv_heads))}
        adapter = DMSAdapter(hidden, kv_heads, eps, scale, offset)
        _load_state(adapter, state, f"{p} layer {layer}")
        adapters.append(adapter.eval())
    return DMSDecisions(adapters, window, per == "layer", str(p), scale=scale, offset=offset)


def _official_tensors(p: Path) -> dict[int, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    index = p / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(f.name for f in p.glob("*.safetensors"))
    if not files:
        raise DMSCheckpointError(f"{p}: no safetensors weights (model.safetensors[.index.json])")
    out: dict[int, dict[str, torch.Tensor]] = {}
    for name in files:
        with safe_open(str(p / name), "pt") as f:
            for key in f.keys():
                match = _OFFICIAL.search(key)
                if match:
                    layer, norm, kind = int(match.group(1)), match.group(2), match.group(3)
                    out.setdefault(layer, {})[f"{'norm' if norm else 'proj'}.{kind}"] = f.get_tensor(key).float()
    if not out:
        raise DMSCheckpointError(f"{p}: no dms_proj_alpha tensors in {', '.join(files)}")
    return out


def _load_state(adapter: DMSAdapter, state: dict, where: str) -> None:
    expected = adapter.state_dict()
    for key, want in expected.items():
        got = state.get(key)
        if got is None:
            raise DMSCheckpointError(f"{where}: missing {key}")
        if tuple(got.shape) != tuple(want.shape):
            raise DMSCheckpointError(f"{where}: {key} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        if not torch.isfinite(got).all():
            raise DMSCheckpointError(f"{where}: {key} has non-finite values")
    adapter.load_state_dict({k: state[k].float() for k in expected})
