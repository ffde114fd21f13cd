"""Triton twin of :mod:`scores_ref`: a step's learned keep scores in one launch per layer.
Each program takes ``BLOCK_T`` tokens and walks the hidden dimension once, accumulating each
KV head's dot product and, for DMS's RMSNorm, the tokens' sums of squares (the norm's
per-token factor applies after the dot: ``(x * r * g) . w = r * ((x * g) . w)``). The head is
a few KV heads wide (8 for Llama-3-8B), so it is a sum over a broadcast product, not a
``tl.dot`` (which needs 16 columns).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_tokens"])
def _linear_scores_kernel(x_ptr, w_ptr, b_ptr, g_ptr, out_ptr, num_tokens, stride_x, eps, scale, shift,
                          D: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, RMS: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    heads = tl.arange(0, HP)
    t_ok, h_ok = tokens < num_tokens, heads < H
    acc = tl.zeros([BLOCK_T, HP], dtype=tl.float32)
    squares = tl.zeros([BLOCK_T], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        x = tl.load(x_ptr + tokens[:, None].to(tl.int64) * stride_x + d[None, :], mask=t_ok[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_D]
        if RMS:
            squares += tl.sum(x * x, axis=1)
            x = x * tl.load(g_ptr + d, mask=d_ok, other=0.0)[None, :]
        w = tl.load(w_ptr + heads[:, None] * D + d[None, :], mask=h_ok[:, None] & d_ok[None, :], other=0.0)  # [HP, BLOCK_D]
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    if RMS:
        acc = acc * (1.0 / tl.sqrt(squares / D + eps))[:, None]
    out = scale * (acc + tl.load(b_ptr + heads, mask=h_ok, other=0.0)[None, :]) + shift
    tl.store(out_ptr + tokens[:, None] * H + heads[None, :], out, mask=t_ok[:, None] & h_ok[None, :])


def tiles(num_tokens: int, dim: int, heads: int) -> dict:
    """Tokens and hidden columns per program, and its warps. A decode step has few tokens
    (32 at B=32): four per program left 8 programs on 132 SMs, each walking 16 steps of 256
    columns, 22 us a layer on the H200 (h200-eviction-14). One token per program while
    tokens are few, and wide column steps (the latency is the walk's length)."""
    block_t = 1 if num_tokens <= 256 else 2
    block_d = min(1024, triton.next_power_of_2(dim))
    width = block_t * max(2, triton.next_power_of_2(heads)) * block_d  # the broadcast product's elements
    return {"block_t": block_t, "block_d": block_d, "num_warps": 4 if width <= 4096 else 8}


def linear_scores(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, norm_weight: torch.Tensor | None = None,
                  eps: float = 1e-6, scale: float = 1.0, shift: float = 0.0, **tile) -> torch.Tensor:
    """:func:`scores_ref.linear_scores` (``x[T, D]`` with unit stride along ``D``; fp32
    ``weight[H, D]``, ``bias[H]``, ``norm_weight[D]``, contiguous). ``tile``: overrides of
    :func:`tiles` (``block_t``, ``block_d``, ``num_warps``; the benchmark's sweep)."""
    num_tokens, dim = x.shape
    heads = weight.shape[0]
    out = torch.empty(num_tokens, heads, dtype=torch.float32, device=x.device)
    tile = tiles(num_tokens, dim, heads) | tile
    grid = (triton.cdiv(num_tokens, tile["block_t"]),)
    _linear_scores_kernel[grid](x, weight, bias, weight if norm_weight is None else norm_weight, out, num_tokens,
                                x.stride(0), float(eps), float(scale), float(shift), D=dim, H=heads,
                                HP=max(2, triton.next_power_of_2(heads)), RMS=norm_weight is not None,
                                BLOCK_T=tile["block_t"], BLOCK_D=tile["block_d"], num_warps=tile["num_warps"])
    return out
