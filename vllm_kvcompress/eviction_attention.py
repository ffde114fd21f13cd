"""Attention glue for eviction methods: physical metadata, and compaction after each
layer's attention. Used by :mod:`vllm_kvcompress.backend` when the method evicts.

Per step, the builder (plan) turns each request's logical length into its physical
row count with the request's schedule (:mod:`vllm_kvcompress.step_plan`): write slots
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

from vllm_kvcompress import step_plan
from vllm_kvcompress.eviction.scorers import SnapKVScorer, scorer_for
from vllm_kvcompress.eviction.selection import keep_indices
from vllm_kvcompress.kernels import compaction_ref


@dataclass
class Compaction:
    req_id: str
    blocks: torch.Tensor  # the request's block-table row
    length: int  # rows held after this step's writes
    target: int  # rows kept
    token_end: int = 0  # end of the request's tokens in this step (SnapKV's window queries end here)


@dataclass
class EvictionPlan:
    compactions: list[Compaction] = field(default_factory=list)
    decode_req_ids: list[str] = field(default_factory=list)
    prefill_req_ids: list[str] = field(default_factory=list)


def physical_layout(m, num_reqs: int, block_size: int, compact: bool):
    """``(kv_lens [R], slot_mapping [T], plan)`` for this step, or None on dummy runs."""
    rows = step_plan.rows
    if rows is None or len(rows) < num_reqs:
        return None
    req_ids = step_plan.req_ids[:num_reqs]
    starts = m.query_start_loc_cpu[: num_reqs + 1].long()
    q_lens = starts[1:] - starts[:-1]
    logical_after = m.seq_lens[:num_reqs].to("cpu").long()
    before = []
    plan = EvictionPlan()
    for r in range(num_reqs):
        schedule, logical = rows[r], int(logical_after[r] - q_lens[r])
        held = schedule.physical_length(logical) if schedule is not None and compact else logical
        before.append(held)
        if schedule is not None and q_lens[r] > 0 and schedule.compacts_at(logical + int(q_lens[r])):
            plan.compactions.append(Compaction(req_ids[r], m.block_table_tensor[r], held + int(q_lens[r]),
                                               schedule.budget, int(starts[r + 1])))
        if q_lens[r] == 1:
            plan.decode_req_ids.append(req_ids[r])
        elif q_lens[r] > 1:
            plan.prefill_req_ids.append(req_ids[r])
    before = torch.tensor(before, dtype=torch.long)
    token_row = torch.repeat_interleave(torch.arange(num_reqs), q_lens)
    position = before[token_row] + torch.arange(int(starts[-1])) - starts[token_row]
    table = m.block_table_tensor[:num_reqs].long().cpu()
    slots = table[token_row, position // block_size] * block_size + position % block_size
    return before + q_lens, slots.to(m.slot_mapping.device), plan


class Evictor:
    """One per attention layer: scores, selects and compacts (or masks) at compaction points."""

    def __init__(self, settings):
        self.scorer = scorer_for(settings)
        self.settings = settings
        self.mask_mode = settings.eviction_mode == "mask"

    def visible(self, req_id: str, layer: int, length: int, heads: int) -> torch.Tensor:
        masks = step_plan.masks.setdefault(req_id, {})
        mask = masks.get(layer)
        if mask is None or mask.shape[1] < length:
            grown = torch.ones(heads, max(length, 2 * (0 if mask is None else mask.shape[1])), dtype=torch.bool)
            if mask is not None:
                grown[:, : mask.shape[1]] = mask
            masks[layer] = mask = grown
        return mask

    def decode_visible(self, req_ids, layer, lengths, heads):
        if not self.mask_mode:
            return None
        width = int(lengths.max())
        return torch.stack([self.visible(r, layer, width, heads)[:, :width] for r in req_ids])

    def prefill_visible(self, req_id, layer, length, heads):
        if not self.mask_mode:
            return None
        return self.visible(req_id, layer, length, heads)[:, :length]

    def _window(self, query, c: Compaction):
        if not isinstance(self.scorer, SnapKVScorer) or query is None:
            return None
        return self.scorer.window_queries(query, c.token_end, c.length)

    def run(self, layer: int, cache: torch.Tensor, fmt, plan: EvictionPlan, query=None) -> None:
        s = self.settings
        for c in plan.compactions:
            keys = fmt.keys(layer, cache, c.blocks, c.length)  # [H, T, D]
            if not self.mask_mode:
                keep = keep_indices(self.scorer.score(keys, queries=self._window(query, c)), c.target,
                                    s.sink_tokens, s.recent_tokens)
                compaction_ref.compact(cache, c.blocks.long(), keep)
                continue
            # The rows each head still sees, in order, stand in for the compacted rows, so
            # sinks and the recent window mean the same tokens in both modes.
            mask = self.visible(c.req_id, layer, c.length, keys.shape[0])
            held = mask[:, : c.length].nonzero()[:, 1].view(keys.shape[0], -1)  # [H, rows held]
            rows = keys.gather(1, held.unsqueeze(-1).expand(-1, -1, keys.shape[-1]))
            keep = held.gather(1, keep_indices(self.scorer.score(rows, queries=self._window(query, c)), c.target,
                                               s.sink_tokens, s.recent_tokens))
            mask[:, : c.length] = False
            mask.scatter_(1, keep, True)
