"""RoPE as Llama/Qwen apply it (``rotate_half``: dim i turns with dim i + D/2, base
``theta``), for code that must move keys between positions: calibration re-rotates keys
to other positions, and the ``kvquant`` cache stores keys turned back to position 0."""

from __future__ import annotations

import torch


def rotate(keys: torch.Tensor, delta: torch.Tensor, theta: float) -> torch.Tensor:
    """Turn keys ``[..., T, D]`` by ``delta[T]`` positions (negative: back); fp32 result."""
    head_dim = keys.shape[-1]
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=keys.device) / head_dim)
    angle = delta.to(device=keys.device, dtype=torch.float64).unsqueeze(-1) * inv_freq  # [T, D/2]
    cos, sin = angle.cos().float(), angle.sin().float()
    x1, x2 = keys[..., : head_dim // 2].float(), keys[..., head_dim // 2 :].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
