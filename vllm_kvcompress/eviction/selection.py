"""Which rows survive a compaction, from per-token scores (higher = keep)."""

from __future__ import annotations

import torch


def keep_indices(scores: torch.Tensor, budget: int, sink_tokens: int = 0, recent_tokens: int = 0) -> torch.Tensor:
    """Row indices ``[H, budget]`` to keep per head, ascending.

    ``scores[H, T]`` (fp32; bf16 ties flip between runs). Sinks (first rows) and the
    recent window (last rows) always stay and count towards the budget. Ties go to the
    earlier row (stable sort), so preemption + recompute repeats the same choice."""
    heads, length = scores.shape
    if budget >= length:
        return torch.arange(length).expand(heads, length)
    scores = scores.float().clone()
    protected = torch.zeros(length, dtype=torch.bool)
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
