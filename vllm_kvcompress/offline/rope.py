"""RoPE as Llama/Qwen apply it (``rotate_half``: dim i turns with dim i + D/2), used to
move post-RoPE keys to other positions for calibration.

A post-RoPE key at position p, turned by ``delta``, is exactly the key the same token
would have at position p + delta (rotations compose). Calibrating codebooks only on the
first few thousand positions leaves the slow (low-frequency) RoPE pairs at angles never
seen at long context; re-rotating calibration keys to random positions up to the
model's context length covers them.
"""

from __future__ import annotations

import torch

from vllm_kvcompress.kernels.rope_ref import rotate  # noqa: F401  (this module's callers use rope.rotate)
from vllm_kvcompress.methods.artefacts import rope_theta


class UnsupportedRope(ValueError):
    pass


def check_default_rope(config) -> float:
    """The RoPE base, refusing scaled or partial RoPE (re-rotation would be wrong there)."""
    params = getattr(config, "rope_parameters", None) or {}
    kind = params.get("rope_type", params.get("type", "default"))
    partial = float(getattr(config, "partial_rotary_factor", 1.0) or 1.0)
    if kind != "default" or partial != 1.0:
        raise UnsupportedRope(f"position-augmented calibration supports plain RoPE only (rope_type {kind!r}, "
                              f"partial_rotary_factor {partial}); calibrate with --positions 0")
    theta = rope_theta(config)
    if theta <= 0:
        raise UnsupportedRope("the model config has no rope_theta; calibrate with --positions 0")
    return theta


def spread_positions(keys: torch.Tensor, theta: float, max_position: int, copies: int,
                     generator: torch.Generator) -> torch.Tensor:
    """``copies`` versions of keys ``[H, T, D]`` (post-RoPE, key t at position t), each key
    moved to a uniformly random position below ``max_position``: ``[H, copies * T, D]``."""
    tokens = keys.shape[1]
    here = torch.arange(tokens)
    return torch.cat([rotate(keys, torch.randint(0, max_position, (tokens,), generator=generator) - here, theta)
                      for _ in range(copies)], 1)
