"""Whole-row eviction in vLLM's own layout (:class:`CompressionSchedule`: knorm, snapkv):
physical metadata, and compaction after each layer's attention.

Per step, the builder (plan) turns each request's logical length into its physical
row count with the request's schedule (from the worker's step plan): write slots
and kernel lengths are physical, RoPE positions stay vLLM's logical ones. A request
whose step ends on a compression point gets a :class:`Compaction`; every layer then
scores its rows, keeps ``target`` per KV head and moves them to the front (run). The
scheduler frees the emptied tail blocks at the next step.

``eviction_mode: "mask"`` is the reference: rows stay where they are and evicted ones
are hidden per (layer, KV head); the same tokens are kept, no memory is freed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_kvcompress.eviction.selection import keep_indices
from vllm_kvcompress.kernels import ops


@dataclass
class Compaction:
    cache: object  # the request's RequestCache
    blocks: torch.Tensor  # the request's block-table row
    length: int  # rows held after this step's writes
    target: int  # rows kept
    token_end: int = 0  # end of the request's tokens in this step (SnapKV's window queries end here)


@dataclass
class EvictionPlan:
    caches: list  # the step's RequestCache of each batch row (their masks in "mask" mode)
    compactions: list[Compaction] = field(default_factory=list)
    decode_rows: list[int] = field(default_factory=list)
    prefill_rows: list[int] = field(default_factory=list)


def physical_layout(m, num_reqs: int, block_size: int, compact: bool, step):
    """``(kv_lens [R], slot_mapping [T], plan)`` for this step, or None on dummy runs."""
    if step is None or len(step.req_ids) < num_reqs:
        return None
    rows = step.schedules
    starts = m.query_start_loc_cpu[: num_reqs + 1].long()
    q_lens = starts[1:] - starts[:-1]
    logical_after = m.seq_lens[:num_reqs].to("cpu").long()
    before = []
    plan = EvictionPlan(step.caches[:num_reqs])
    for r in range(num_reqs):
        schedule, logical = rows[r], int(logical_after[r] - q_lens[r])
        held = schedule.physical_length(logical) if schedule is not None and compact else logical
        before.append(held)
        if schedule is not None and q_lens[r] > 0 and schedule.compacts_at(logical + int(q_lens[r])):
            plan.compactions.append(Compaction(step.caches[r], m.block_table_tensor[r], held + int(q_lens[r]),
                                               schedule.budget, int(starts[r + 1])))
        if q_lens[r] == 1:
            plan.decode_rows.append(r)
        elif q_lens[r] > 1:
            plan.prefill_rows.append(r)
    before = torch.tensor(before, dtype=torch.long)
    token_row = torch.repeat_interleave(torch.arange(num_reqs), q_lens)
    position = before[token_row] + torch.arange(int(starts[-1])) - starts[token_row]
    table = m.block_table_tensor[:num_reqs].long().cpu()
    slots = table[token_row, position // block_size] * block_size + position % block_size
    return before + q_lens, slots.to(m.slot_mapping.device), plan


class Evictor:
    """One per attention layer: scores, selects and compacts (or masks) at compaction points."""

    def __init__(self, method):
        self.scorer = method.scorer()
        self.sink, self.recent = method.protected()
        self.mask_mode = method.masks

    @staticmethod
    def visible(cache, layer: int, length: int, heads: int) -> torch.Tensor:
        mask = cache.masks.get(layer)
        if mask is None or mask.shape[1] < length:
            grown = torch.ones(heads, max(length, 2 * (0 if mask is None else mask.shape[1])), dtype=torch.bool)
            if mask is not None:
                grown[:, : mask.shape[1]] = mask
            cache.masks[layer] = mask = grown
        return mask

    def decode_visible(self, plan: EvictionPlan, layer, lengths, heads):
        if not self.mask_mode:
            return None
        width = int(lengths.max())
        return torch.stack([self.visible(plan.caches[r], layer, width, heads)[:, :width] for r in plan.decode_rows])

    def prefill_visible(self, plan: EvictionPlan, i: int, layer, length, heads):
        if not self.mask_mode:
            return None
        return self.visible(plan.caches[plan.prefill_rows[i]], layer, length, heads)[:, :length]

    def run(self, layer: int, cache: torch.Tensor, fmt, plan: EvictionPlan, query=None) -> None:
        for c in plan.compactions:
            keys = fmt.keys(layer, cache, c.blocks, c.length)  # [H, T, D]
            queries = None if query is None else self.scorer.window_queries(query, c.token_end, c.length)
            if not self.mask_mode:
                keep = keep_indices(self.scorer.score(keys, queries=queries), c.target, self.sink, self.recent)
                ops.compact(cache, c.blocks.long(), keep)
                continue
            # The rows each head still sees, in order, stand in for the compacted rows, so
            # sinks and the recent window mean the same tokens in both modes.
            mask = self.visible(c.cache, layer, c.length, keys.shape[0])
            held = mask[:, : c.length].nonzero()[:, 1].view(keys.shape[0], -1)  # [H, rows held]
            rows = keys.gather(1, held.unsqueeze(-1).expand(-1, -1, keys.shape[-1]))
            keep = held.gather(1, keep_indices(self.scorer.score(rows, queries=queries), c.target, self.sink,
                                               self.recent))
            mask[:, : c.length] = False
            mask.scatter_(1, keep, True)
