"""KVzap training pieces: the KVzip+ oracle that the predictors learn, closed-form / SGD
fits, and quality metrics. Plain tensors; no vLLM, no transformers.

Oracle (per layer): a text followed by its own repetition. For every query head ``g``,
every query ``j`` of the repeated copy and every key ``i`` of the original copy,
``s[g, j, i] = a[g, j, i] * ||W_O^g v_i|| / ||h_j||`` (attention weight times the size of
what token ``i`` would add to the residual stream through head ``g``, relative to the
hidden state it is added to); the KV head's target is ``log max_{g in group, j} s``.
"""

from __future__ import annotations

import torch

from vllm_kvcompress.methods.kvzap.predictors import LinearPredictor, MLPPredictor

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


