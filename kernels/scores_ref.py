"""Learned keep scores of a step's tokens from one linear head, the reference for
:mod:`scores_triton`: KVzap's linear predictor and DMS's adapters (an RMSNorm, then a linear
map) both score as ``scale * linear(norm(x)) + shift``, per KV head, in fp32.

Eager PyTorch runs these as four to eight kernels per layer (the cast, the norm's pieces, the
GEMM, the affine); inside a CUDA graph each still costs its launch slot, and 32 layers of
them took 1.2-1.4 ms of a decode step on the H200 (``benchmarks.predictor_cost``,
h200-eviction-13): about 6% of a 21 ms B=32 step, where the issue's goal is 2%.
"""

from __future__ import annotations

import torch


def linear_scores(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, norm_weight: torch.Tensor | None = None,
                  eps: float = 1e-6, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """``scale * (rms_norm(x) @ weight.T + bias) + shift`` ``[T, H]`` (fp32) of ``x[T, D]``;
    without ``norm_weight`` no norm (``x`` as fp32)."""
    x = x.float()
    if norm_weight is not None:
        x = torch.nn.functional.rms_norm(x, (x.shape[-1],), norm_weight, eps)
    return scale * torch.nn.functional.linear(x, weight, bias) + shift
