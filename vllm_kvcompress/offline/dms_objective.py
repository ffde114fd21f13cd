"""DMS retrofit objective (Łańcucki et al., NeurIPS 2025): Gumbel-sigmoid decisions with a
straight-through gradient, the training attention bias, and the compression schedule and
loss. Plain tensors; no vLLM."""

from __future__ import annotations

import torch

def gumbel_sigmoid(logits: torch.Tensor, tau: float = 0.1, generator: torch.Generator | None = None,
                   noisy: torch.Tensor | None = None) -> torch.Tensor:
    """Training decisions: ``hard`` 0/1 in the forward pass, the soft
    ``sigmoid((z + g) / tau)`` gradient in the backward pass (straight-through); ``g`` is
    logistic noise (the difference of two Gumbel(0, 1)). ``noisy`` reuses
    :func:`noisy_logits` already drawn (the same noise as the attention bias)."""
    soft = torch.sigmoid(noisy_logits(logits, tau, generator) if noisy is None else noisy)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + soft - soft.detach()


def noisy_logits(logits: torch.Tensor, tau: float = 0.1, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(z + g) / tau`` with logistic noise ``g``."""
    # Drawn where the generator lives (CPU by default) so a seed gives the same noise on any device.
    u = torch.rand(logits.shape, generator=generator).to(logits.device).clamp(1e-6, 1 - 1e-6)
    return (logits + torch.log(u) - torch.log1p(-u)) / tau


def shift_to_keys(decisions: torch.Tensor) -> torch.Tensor:
    """``[..., T]`` decisions made at each position -> the decision of each *key* (made
    one position later); the last key's is not made yet (0)."""
    out = torch.zeros_like(decisions)
    out[..., :-1] = decisions[..., 1:]
    return out


def log_keep_bias(noisy: torch.Tensor, window: int) -> torch.Tensor:
    """Training attention bias ``[H, T, T]`` from the keys' noisy logits ``[H, T]`` (already
    shifted): ``log(1 - alpha_j) = logsigmoid(-noisy_j)`` where ``query - key > window``,
    0 inside the window, -inf above the diagonal. Smooth in the logits (no clamp)."""
    length = noisy.shape[1]
    i = torch.arange(length, device=noisy.device)[:, None]
    j = torch.arange(length, device=noisy.device)[None, :]
    bias = torch.where(((i - j) > window)[None], torch.nn.functional.logsigmoid(-noisy)[:, None, :],
                       torch.zeros((), device=noisy.device, dtype=noisy.dtype))
    return bias.masked_fill((j > i)[None], float("-inf"))


def target_ratio(step: int, steps_per_unit: int = 100, max_ratio: float = 8.0) -> float:
    """The compression-ratio schedule: 1 at step 0, +1 every ``steps_per_unit`` steps."""
    return min(1.0 + step / steps_per_unit, max_ratio)


def compression_loss(alpha: torch.Tensor, ratio: float) -> torch.Tensor:
    """One-sided L1: ``max(0, (1 - 1 / ratio) - mean(alpha))`` over every decision."""
    return torch.relu(torch.tensor(1.0 - 1.0 / ratio, device=alpha.device) - alpha.mean())
