"""Which rows survive a compaction, from per-token scores (higher = keep)."""

from __future__ import annotations

from dataclasses import dataclass

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
    scores.masked_fill_(protected[None, :], float("inf"))  # no boolean index: no device read-back
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return torch.sort(order[:, :budget], dim=1).values


def keep_indices_per_head(scores: torch.Tensor, budgets: list[int], sink_tokens: int = 0,
                          recent_tokens: int = 0) -> list[torch.Tensor]:
    """Like :func:`keep_indices` with a budget per head (HeadKV): one ascending index
    tensor per head, ``min(budget, T)`` long."""
    return [keep_indices(scores[h:h + 1], budget, sink_tokens, recent_tokens)[0] for h, budget in enumerate(budgets)]


@dataclass(frozen=True)
class BatchTargets:
    """What a batched selection needs of its ``R`` requests, on the device once per step
    (every layer's selection shares it): rows held, rows kept (int32, as ``compact_batch``
    takes them), and the host bound on the latter."""

    lengths: torch.Tensor  # [R] long
    keep_lens: torch.Tensor  # [R] int32
    max_keep: int

    @classmethod
    def of(cls, lengths: list[int], targets: list[int], device) -> "BatchTargets":
        kept = [min(t, n) for t, n in zip(targets, lengths)]
        return cls(ops.to_device(torch.tensor(lengths, dtype=torch.long), device),
                   ops.to_device(torch.tensor(kept, dtype=torch.int32), device), max(kept, default=0))


def keep_indices_batch(scores: torch.Tensor, targets: BatchTargets, sink_tokens: int = 0,
                       recent_tokens: int = 0) -> torch.Tensor:
    """:func:`keep_indices` for ``R`` requests at once, on the scores' device with no
    read-back: ``scores[..., R, H, L]`` (leading dims: layers), padded past each request's
    length. Returns ``keep[..., R, H, max_keep]``: request ``r``'s first
    ``targets.keep_lens[r]`` entries ascending, then padding, as ``compact_layers`` takes
    them. Per request (and layer), the rows :func:`keep_indices` keeps."""
    width = scores.shape[-1]
    row = torch.arange(width, device=scores.device)[None, :]
    valid = row < targets.lengths[:, None]  # [R, L]
    protected = row < sink_tokens
    if recent_tokens:
        protected = protected | (row >= targets.lengths[:, None] - recent_tokens)
    scores = scores.float().masked_fill((protected & valid)[:, None, :], float("inf"))
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))  # padding sorts after every real row
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., : targets.max_keep]  # ties: earlier
    beyond = torch.arange(targets.max_keep, device=scores.device)[None, None, :] >= targets.keep_lens[:, None, None]
    return ascending(order.masked_fill(beyond, width), width)


def ascending(chosen: torch.Tensor, width: int) -> torch.Tensor:
    """``chosen[..., K]``: distinct row ids below ``width``, or ``width`` for padding -> the same ids
    ascending, padding last. What a sort gives, by marking the rows and counting them (a cumulative
    sum and a scatter: elementwise passes instead of a second segmented sort)."""
    shape, most = chosen.shape, chosen.shape[-1]
    marked = torch.zeros(*shape[:-1], width + 1, dtype=torch.bool, device=chosen.device)
    marked.scatter_(-1, chosen, True)
    marked = marked[..., :width]
    slot = marked.cumsum(-1)  # one int64 temporary, changed in place: the evictor bounds this memory
    slot.sub_(1).masked_fill_(~marked, most)  # rows not chosen go to a column dropped below
    rows = torch.arange(width, device=chosen.device).expand(*shape[:-1], width)
    out = torch.full((*shape[:-1], most + 1), width, dtype=chosen.dtype, device=chosen.device)
    return out.scatter_(-1, slot, rows)[..., :most]
