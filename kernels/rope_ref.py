"""RoPE as Llama/Qwen apply it (``rotate_half``: dim i turns with dim i + D/2, base
``theta``), for code that must move keys between positions: calibration re-rotates keys
to other positions, and the ``kvquant`` cache stores keys turned back to position 0."""

from __future__ import annotations

import torch

# (theta, head_dim, device) -> (cos, sin) [P, D/2] fp32 of positions 0..P-1, grown on demand:
# a decode step re-rotates every kept key, and the float64 trigonometry of each angle would
# otherwise be recomputed at every step and layer.
_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
MAX_TABLE = 1 << 17  # positions; farther ones (calibration over long position ranges) are computed directly


def _angles(delta: torch.Tensor, head_dim: int, theta: float, device) -> torch.Tensor:
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    return delta.to(device=device, dtype=torch.float64).unsqueeze(-1) * inv_freq  # [T, D/2]


def _direct(delta: torch.Tensor, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    angle = _angles(delta, head_dim, theta, device)
    return angle.cos().float(), angle.sin().float()


def cos_sin(delta: torch.Tensor, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` ``[T, D/2]`` fp32 of the angles ``delta[T] * theta^(-2i/D)``, each computed in
    float64 and rounded once. Whole-number deltas are looked up in a table (the same values)."""
    if delta.dtype.is_floating_point or delta.numel() == 0:
        return _direct(delta, head_dim, theta, device)
    delta = delta.to(device=device, dtype=torch.long)
    index = delta.abs()
    farthest = int(index.max())
    if farthest >= MAX_TABLE:
        return _direct(delta, head_dim, theta, device)
    key = (float(theta), head_dim, str(torch.device(device)))
    table = _TABLES.get(key)
    if table is None or table[0].shape[0] <= farthest:
        table = _TABLES[key] = _direct(torch.arange(1 << max(10, farthest.bit_length()), device=device), head_dim,
                                       theta, device)
    cos, sin = table[0][index], table[1][index]
    return cos, torch.where((delta < 0).unsqueeze(-1), -sin, sin)  # cos(-a) = cos a, sin(-a) = -sin a


def rotate(keys: torch.Tensor, delta: torch.Tensor, theta: float) -> torch.Tensor:
    """Turn keys ``[..., T, D]`` by ``delta[T]`` positions (negative: back); fp32 result."""
    head_dim = keys.shape[-1]
    cos, sin = cos_sin(delta, head_dim, theta, keys.device)
    x1, x2 = keys[..., : head_dim // 2].float(), keys[..., head_dim // 2 :].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
