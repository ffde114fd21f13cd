"""KVzap (Jégou & Jeblick, 2026), engine-neutral parts: the KVzip+ oracle that the
predictors learn, the predictors (Linear, MLP), their closed-form / SGD training and
quality metrics. Plain tensors; no vLLM, no transformers.

Oracle (per layer): a text followed by its own repetition. For every query head ``g``,
every query ``j`` of the repeated copy and every key ``i`` of the original copy,
``s[g, j, i] = a[g, j, i] * ||W_O^g v_i|| / ||h_j||`` (attention weight times the size of
what token ``i`` would add to the residual stream through head ``g``, relative to the
hidden state it is added to); the KV head's target is ``log max_{g in group, j} s``.

Predictor (per layer): attention-input hidden state of token ``i`` (after the input
norm) -> one log-score per KV head; higher = keep.
"""

from __future__ import annotations

import torch

FORMAT = "kvcompress-kvzap/1"


def head_output_norms(values: torch.Tensor, o_proj: torch.Tensor, group: int) -> torch.Tensor:
    """``||W_O^g v_i||`` for every query head ``g``: values ``[Hkv, T, D]``, o_proj weight
    ``[hidden, Hq * D]`` -> ``[Hq, T]``."""
    num_kv_heads, _, head_dim = values.shape
    per_head = o_proj.float().view(o_proj.shape[0], num_kv_heads * group, head_dim).permute(1, 2, 0)  # [Hq, D, hidden]
    v = values.float().repeat_interleave(group, 0)  # the KV head each query head reads
    return torch.linalg.vector_norm(torch.bmm(v, per_head), dim=-1)


def kvzip_plus_targets(attention: torch.Tensor, output_norms: torch.Tensor, hidden_norms: torch.Tensor,
                       group: int, eps: float = 1e-30) -> torch.Tensor:
    """Log KVzip+ scores ``[Hkv, T]`` of the original copy's ``T`` tokens.

    ``attention[Hq, R, T]``: softmax weights of the repeated copy's ``R`` queries on the
    original's keys; ``output_norms[Hq, T]`` from :func:`head_output_norms`;
    ``hidden_norms[R]``: ``||h_j||`` of the repeated queries' attention inputs."""
    weighted = attention.float() * output_norms.float()[:, None, :] / hidden_norms.float()[None, :, None]
    best = weighted.amax(dim=1)  # over the repeated queries: [Hq, T]
    best = best.view(-1, group, best.shape[-1]).amax(dim=1)  # over the GQA group: [Hkv, T]
    return torch.log(best.clamp_min(eps))


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


def fit_ridge(features: torch.Tensor, targets: torch.Tensor, alpha: float = 1.0) -> LinearPredictor:
    """Closed-form ridge with an unpenalised intercept (scikit-learn ``Ridge(alpha)``):
    features ``[N, D]``, targets ``[N, H]``; solved in float64."""
    x, y = features.double(), targets.double()
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc + alpha * torch.eye(x.shape[1], dtype=torch.float64)
    weight = torch.linalg.solve(gram, xc.T @ yc).T  # [H, D]
    model = LinearPredictor(x.shape[1], y.shape[1])
    with torch.no_grad():
        model.proj.weight.copy_(weight.float())
        model.proj.bias.copy_((y_mean - weight @ x_mean).float())
    return model


def fit_mlp(features: torch.Tensor, targets: torch.Tensor, epochs: int = 15, lr: float = 5e-3, batch: int = 512,
            seed: int = 0, progress=None, width: int | None = None) -> MLPPredictor:
    """The paper's recipe: MSE, AdamW, cosine schedule, gradient clipping at 1.0."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MLPPredictor(features.shape[1], targets.shape[1], width)
    steps = epochs * -(-features.shape[0] // batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(epochs):
        order = torch.randperm(features.shape[0], generator=gen)
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            loss = torch.nn.functional.mse_loss(model(features[idx].float()), targets[idx].float())
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            if progress is not None:
                progress(float(loss.detach()))
    return model


def quality(predicted: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """R² and Pearson correlation of predicted vs oracle log-scores (all heads pooled)."""
    p, t = predicted.detach().double().flatten(), target.detach().double().flatten()
    residual = ((t - p) ** 2).sum()
    total = ((t - t.mean()) ** 2).sum()
    pearson = torch.corrcoef(torch.stack([p, t]))[0, 1]
    return {"r2": float(1 - residual / total), "pearson": float(pearson)}


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
    """Predictors written by ``vllm_kvcompress.kvzap_train`` (safetensors only), checked
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
