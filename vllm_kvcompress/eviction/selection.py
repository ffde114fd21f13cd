"""Which rows survive a compaction, from per-token scores (higher = keep)."""

from __future__ import annotations

import torch

from vllm_kvcompress.kernels import ops


def keep_indices(scores: torch.Tensor, budget: int, sink_tokens: int = 0, recent_tokens: int = 0) -> torch.Tensor:
    """Row indices ``[H, budget]`` to keep per head, ascending.

    ``scores[H, T]`` (fp32; bf16 ties flip between runs). Sinks (first rows) and the
    recent window (last rows) always stay and count towards the budget. Ties go to the
    earlier row (stable sort), so preemption + recompute repeats the same choice."""
    heads, length = scores.shape
    if budget >= length:
        return torch.arange(length, device=scores.device).expand(heads, length)
    scores = scores.float().clone()
    protected = torch.zeros(length, dtype=torch.bool, device=scores.device)
    protected[: min(sink_tokens, length)] = True
    if recent_tokens:
        protected[max(0, length - recent_tokens):] = True
    scores[:, protected] = float("inf")
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return torch.sort(order[:, :budget], dim=1).values


def keep_indices_per_head(scores: torch.Tensor, budgets: list[int], sink_tokens: int = 0,
                          recent_tokens: int = 0) -> list[torch.Tensor]:
    """Like :func:`keep_indices` with a budget per head (HeadKV): one ascending index
    tensor per head, ``min(budget, T)`` long."""
    return [keep_indices(scores[h:h + 1], budget, sink_tokens, recent_tokens)[0] for h, budget in enumerate(budgets)]


def keep_indices_batch(scores: torch.Tensor, lengths: list[int], targets: list[int], sink_tokens: int = 0,
                       recent_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`keep_indices` for ``R`` requests at once, on the scores' device with no
    read-back: ``scores[R, H, L]`` padded past each request's ``lengths[r]`` (host ints),
    ``targets[r]`` rows to keep. Returns ``keep[R, H, max_keep]`` (request ``r``'s first
    ``keep_lens[r]`` entries ascending, then padding) and ``keep_lens[R]`` (int32), as
    ``compact_batch`` takes them. Per request, the rows :func:`keep_indices` keeps."""
    num_reqs, heads, width = scores.shape
    device = scores.device
    kept = [min(t, n) for t, n in zip(targets, lengths)]
    max_keep = max(kept, default=0)
    lengths_d = ops.to_device(torch.tensor(lengths, dtype=torch.long), device)
    keep_lens = ops.to_device(torch.tensor(kept, dtype=torch.int32), device)
    row = torch.arange(width, device=device)[None, :]
    valid = row < lengths_d[:, None]  # [R, L]
    protected = row < sink_tokens
    if recent_tokens:
        protected = protected | (row >= lengths_d[:, None] - recent_tokens)
    scores = scores.float().masked_fill((protected & valid)[:, None, :], float("inf"))
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))  # padding sorts after every real row
    order = torch.sort(scores, dim=2, descending=True, stable=True).indices[:, :, :max_keep]  # ties: earlier row
    beyond = torch.arange(max_keep, device=device)[None, None, :] >= keep_lens[:, None, None]
    keep = torch.sort(order.masked_fill(beyond, width), dim=2).values  # kept rows ascending, padding last
    return keep, keep_lens
