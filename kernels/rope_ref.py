"""RoPE as Llama/Qwen apply it (``rotate_half``: dim i turns with dim i + D/2, base
``theta``), for code that must move keys between positions: calibration re-rotates keys
to other positions, and the ``kvquant`` cache stores keys turned back to position 0."""

from __future__ import annotations

import torch

# (theta, head_dim, device) -> [P, D] fp32 table, cos of positions 0..P-1 in its first half and sin
# in its second (one gather per lookup), grown on demand: a decode step re-rotates every kept key,
# and the float64 trigonometry of each angle would otherwise be recomputed at every step and layer.
_TABLES: dict[tuple, torch.Tensor] = {}
MAX_TABLE = 1 << 17  # positions; farther ones (calibration over long position ranges) are computed directly


def _angles(delta: torch.Tensor, head_dim: int, theta: float, device) -> torch.Tensor:
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    return delta.to(device=device, dtype=torch.float64).unsqueeze(-1) * inv_freq  # [T, D/2]


def _direct(delta: torch.Tensor, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    angle = _angles(delta, head_dim, theta, device)
    return angle.cos().float(), angle.sin().float()


def cos_sin(delta: torch.Tensor, head_dim: int, theta: float, device,
            nonnegative: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` ``[..., D/2]`` fp32 of the angles ``delta[...] * theta^(-2i/D)``, each computed
    in float64 and rounded once. Whole-number deltas are looked up in a table (the same values);
    ``nonnegative``: the caller knows every delta is >= 0 (a key's position), no sign to apply."""
    if delta.dtype.is_floating_point or delta.numel() == 0:
        return _direct(delta, head_dim, theta, device)
    delta = delta.to(device=device, dtype=torch.long)
    index = delta if nonnegative else delta.abs()
    if nonnegative and delta.device.type == "cuda":
        # Reading the farthest position back would synchronise (and break a CUDA graph's
        # capture): the whole table, positions clamped (start-up bounds max_model_len by it;
        # a graph's padding rows carry position -1).
        index = index.clamp(0, MAX_TABLE - 1)
        both = table(theta, head_dim, delta.device, MAX_TABLE).index_select(0, index.flatten())
        both = both.view(*index.shape, head_dim)
        return both[..., : head_dim // 2], both[..., head_dim // 2 :]
    farthest = int(index.max())
    if farthest >= MAX_TABLE:
        return _direct(delta, head_dim, theta, device)
    # index_select: faster than table[index] on the CPU
    both = table(theta, head_dim, delta.device, farthest + 1).index_select(0, index.flatten())
    both = both.view(*index.shape, head_dim)
    cos, sin = both[..., : head_dim // 2], both[..., head_dim // 2 :]
    return (cos, sin) if nonnegative else (cos, torch.where((delta < 0).unsqueeze(-1), -sin, sin))  # sin(-a) = -sin a


def table(theta: float, head_dim: int, device, positions: int) -> torch.Tensor:
    """The ``[P, D]`` fp32 table :func:`cos_sin` looks up (cos of positions ``0..P-1`` in its
    first half, sin in its second), ``P >= positions``, for kernels that look up on their own."""
    if positions > MAX_TABLE:
        raise ValueError(f"{positions} positions: tables hold at most {MAX_TABLE}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (float(theta), head_dim, device)
    found = _TABLES.get(key)
    if found is None or found.shape[0] < positions:  # grown by powers of two
        cos, sin = _direct(torch.arange(1 << max(10, (positions - 1).bit_length()), device=device), head_dim, theta,
                           device)
        found = _TABLES[key] = torch.cat([cos, sin], -1)
    return found


def rotate(keys: torch.Tensor, delta: torch.Tensor, theta: float, nonnegative: bool = False,
           back: bool = False) -> torch.Tensor:
    """Turn keys ``[..., T, D]`` by ``delta[..., T]`` positions (negative: back); fp32 result.
    ``nonnegative``: every delta is a whole number >= 0 (keys turned to their positions);
    ``back``: turn by ``-delta`` instead (keys at positions ``delta`` turned to 0), sparing the
    signs of a negated table lookup (the cache write turns one token per layer and step)."""
    head_dim, half = keys.shape[-1], keys.shape[-1] // 2
    cos, sin = cos_sin(delta, head_dim, theta, keys.device, nonnegative)
    x1, x2 = keys[..., :half].float(), keys[..., half:].float()
    out = torch.empty(torch.broadcast_shapes(keys.shape, (*cos.shape[:-1], head_dim)), dtype=torch.float32,
                      device=keys.device)
    # Written in place, half by half: no temporaries for the four products and the concatenation.
    sign = 1 if back else -1  # sin(-a) = -sin(a)
    torch.mul(x1, cos, out=out[..., :half]).addcmul_(x2, sin, value=sign)
    torch.mul(x2, cos, out=out[..., half:]).addcmul_(x1, sin, value=-sign)
    return out
