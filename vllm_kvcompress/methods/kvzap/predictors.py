"""KVzap predictors (Jégou & Jeblick, 2026): per layer, the attention-input hidden state of
a token (after the input norm) -> one log-score per KV head; higher = keep. The modules
(Linear, MLP) and their files (ours, or the published ``nvidia/KVzap-*`` folders).
Training lives in :mod:`vllm_kvcompress.offline.kvzap_fit`. Plain tensors; no vLLM.
"""

from __future__ import annotations

import torch

FORMAT = "kvcompress-kvzap/1"


class LinearPredictor(torch.nn.Module):
    """KVzap-Linear: ``hidden -> H_kv`` log-scores."""

    def __init__(self, hidden: int, num_kv_heads: int):
        super().__init__()
        self.proj = torch.nn.Linear(hidden, num_kv_heads)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h)


class MLPPredictor(torch.nn.Module):
    """KVzap-MLP: ``hidden -> hidden/8 -> GELU -> H_kv`` (the paper's width)."""

    def __init__(self, hidden: int, num_kv_heads: int, width: int | None = None):
        super().__init__()
        width = width or max(hidden // 8, 1)
        self.net = torch.nn.Sequential(torch.nn.Linear(hidden, width), torch.nn.GELU(), torch.nn.Linear(width, num_kv_heads))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class PredictorFileError(ValueError):
    """A predictor file that cannot serve this model; the message names the file."""


def _layer_state(tensors: dict, layer: int) -> dict:
    """``layers.{layer}.<name>`` tensors as ``<name>``."""
    prefix = f"layers.{layer}."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _loaded(module: torch.nn.Module, state: dict, source, layer: int) -> torch.nn.Module:
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise PredictorFileError(f"KVzap predictors {source}: layer {layer}: {exc}") from exc
    return module.eval()


def load_predictors(path, num_layers: int, hidden: int, num_kv_heads: int) -> list[torch.nn.Module]:
    """Predictors written by ``vllm_kvcompress.offline.kvzap_train`` (safetensors only), checked
    against the model's shape."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as exc:
        raise PredictorFileError(f"KVzap predictors {path}: cannot read safetensors ({exc})") from exc
    if meta.get("format") != FORMAT or meta.get("kind") not in ("linear", "mlp"):
        raise PredictorFileError(f"KVzap predictors {path}: not a {FORMAT} file (metadata {meta})")
    shape = tuple(int(meta.get(k, -1)) for k in ("num_layers", "hidden_size", "num_kv_heads"))
    if shape != (num_layers, hidden, num_kv_heads):
        raise PredictorFileError(f"KVzap predictors {path}: made for (layers, hidden, KV heads) = {shape}, "
                                 f"model has {(num_layers, hidden, num_kv_heads)}")
    predictors = []
    for layer in range(num_layers):
        state = _layer_state(tensors, layer)
        if meta["kind"] == "linear":
            module = LinearPredictor(hidden, num_kv_heads)
        else:
            module = MLPPredictor(hidden, num_kv_heads, state["net.0.weight"].shape[0] if "net.0.weight" in state else None)
        predictors.append(_loaded(module, state, path, layer))
    return predictors


def load_published_predictors(folder, num_layers: int, hidden: int, num_kv_heads: int) -> list[torch.nn.Module]:
    """The ``nvidia/KVzap-*`` layout (a folder with ``config.json``: ``input_dim``,
    ``output_dim``, ``n_modules``, ``hidden_dim`` (null = linear), and ``model.safetensors``
    with ``layers.{i}.weight``/``.bias`` or ``layers.{i}.{0,2}.weight``/``.bias``)."""
    import json
    from pathlib import Path

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        tensors = load_file(str(folder / "model.safetensors"))
    except (OSError, json.JSONDecodeError, SafetensorError) as exc:
        raise PredictorFileError(f"KVzap predictors {folder}: need config.json and model.safetensors ({exc})") from exc
    shape = (config.get("n_modules"), config.get("input_dim"), config.get("output_dim"))
    if shape != (num_layers, hidden, num_kv_heads):
        raise PredictorFileError(f"KVzap predictors {folder}: made for (layers, hidden, KV heads) = {shape}, "
                                 f"model has {(num_layers, hidden, num_kv_heads)}")
    width = config.get("hidden_dim")
    predictors = []
    for layer in range(num_layers):
        state = _layer_state(tensors, layer)
        if width is None:
            module, state = LinearPredictor(hidden, num_kv_heads), {f"proj.{k}": v for k, v in state.items()}
        else:
            module, state = MLPPredictor(hidden, num_kv_heads, int(width)), {f"net.{k}": v for k, v in state.items()}
        predictors.append(_loaded(module, state, folder, layer))
    return predictors


def load_any_predictors(path, num_layers: int, hidden: int, num_kv_heads: int) -> list[torch.nn.Module]:
    """A ``kvzap_train`` safetensors file, or a published ``nvidia/KVzap-*`` folder."""
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        return load_published_predictors(path, num_layers, hidden, num_kv_heads)
    if not path.is_file():
        raise PredictorFileError(f"KVzap predictors {path}: no such file or folder")
    return load_predictors(path, num_layers, hidden, num_kv_heads)
