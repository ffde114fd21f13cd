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

from vllm_kvcompress.eviction.selection import BatchTargets, keep_indices, keep_indices_batch
from vllm_kvcompress.kernels import ops


@dataclass
class Compaction:
    cache: object  # the request's RequestCache
    row: int  # the request's batch row (its block-table row)
    length: int  # rows held after this step's writes
    target: int  # rows kept
    token_end: int = 0  # end of the request's tokens in this step (SnapKV's window queries end here)


@dataclass
class EvictionPlan:
    """A step's whole-row eviction, built once by the metadata builder. The compactions run
    after the step's forward (:meth:`Evictor.run`, called by the runner for every layer), so
    a decode step that replays a CUDA graph compacts as an eager one does."""

    caches: list  # the step's RequestCache of each batch row (their masks in "mask" mode)
    block_table: torch.Tensor | None = None  # vLLM's block table of the step (device)
    compactions: list[Compaction] = field(default_factory=list)
    decode_rows: list[int] = field(default_factory=list)
    prefill_rows: list[int] = field(default_factory=list)
    queries: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> window queries per compaction
    _batch: tuple | None = None

    def batch(self) -> tuple[torch.Tensor, int, BatchTargets]:
        """``(block_table[R, max_blocks], longest, targets)`` of the compacting requests,
        made once per step (a few small copies to the device) and shared by every layer."""
        if self._batch is None:
            device = self.block_table.device
            rows = ops.to_device(torch.tensor([c.row for c in self.compactions]), device)
            lengths = [c.length for c in self.compactions]
            self._batch = (self.block_table.index_select(0, rows), max(lengths),
                           BatchTargets.of(lengths, [c.target for c in self.compactions], device))
        return self._batch


def _plan_row(plan: EvictionPlan, step, r: int, logical: int, q_len: int, compact: bool, token_end: int) -> int:
    """Rows request ``r`` holds before this step's ``q_len`` tokens; records its compaction."""
    schedule = step.caches[r].schedule if step.caches[r] is not None else None
    held = schedule.physical_length(logical) if schedule is not None and compact else logical
    if schedule is not None and q_len > 0 and schedule.compacts_at(logical + q_len):
        plan.compactions.append(Compaction(step.caches[r], r, held + q_len, schedule.budget, token_end))
    return held


def physical_layout(m, num_reqs: int, seq_lens: torch.Tensor, block_size: int, compact: bool, step):
    """``(kv_lens [R], slot_mapping [T], plan)`` for this step, or None on dummy runs.
    ``seq_lens``: logical lengths after the step, on the host (no read-back)."""
    if step is None or len(step.req_ids) < num_reqs:
        return None
    starts = m.query_start_loc_cpu[: num_reqs + 1].long()
    q_lens = starts[1:] - starts[:-1]
    plan = EvictionPlan(step.caches[:num_reqs], m.block_table_tensor[:num_reqs])
    before = []
    for r in range(num_reqs):
        q_len = int(q_lens[r])
        before.append(_plan_row(plan, step, r, int(seq_lens[r]) - q_len, q_len, compact, int(starts[r + 1])))
        if q_len == 1:
            plan.decode_rows.append(r)
        elif q_len > 1:
            plan.prefill_rows.append(r)
    before = torch.tensor(before, dtype=torch.long)
    token_row = torch.repeat_interleave(torch.arange(num_reqs), q_lens)
    position = before[token_row] + torch.arange(int(starts[-1])) - starts[token_row]
    device = m.block_table_tensor.device
    index = ops.to_device(torch.stack([token_row, position // block_size]), device)
    slots = m.block_table_tensor[index[0], index[1]].long() * block_size + ops.to_device(position % block_size, device)
    return before + q_lens, slots, plan


class DecodeBuffers:
    """Whole-row eviction's decode metadata in persistent device buffers (one set per
    metadata builder), so that a batch of single-token decodes can replay a CUDA graph:
    the builder refills them before every step, the captured kernels read them."""

    def __init__(self, max_reqs: int, device: torch.device):
        self.kv_lens = torch.zeros(max_reqs, dtype=torch.int32, device=device)
        self.slots = torch.full((max_reqs,), -1, dtype=torch.long, device=device)

    def fill(self, m, num_reqs: int, seq_lens: torch.Tensor, block_size: int, step):
        """Physical lengths and write slots of a decode-only batch; rows past the step's
        requests are padding (a replayed graph's batch size): length 0, slot -1. Returns
        ``(plan, longest row)``; ``(None, max_seq_len)`` on dummy runs and graph capture,
        which take vLLM's logical lengths."""
        if step is None:
            self.kv_lens[:num_reqs].copy_(m.seq_lens[:num_reqs])
            self.slots[:num_reqs].copy_(m.slot_mapping[:num_reqs])
            return None, int(m.max_seq_len)
        real = min(num_reqs, len(step.req_ids))
        plan = EvictionPlan(step.caches[:real], m.block_table_tensor[:num_reqs], decode_rows=list(range(real)))
        after = [_plan_row(plan, step, r, int(seq_lens[r]) - 1, 1, True, r + 1) + 1 for r in range(real)]
        lens = ops.to_device(torch.tensor(after + [0] * (num_reqs - real), dtype=torch.int32), self.kv_lens.device)
        self.kv_lens[:num_reqs].copy_(lens)
        last = (lens.long() - 1).clamp(min=0)
        page = plan.block_table.gather(1, (last // block_size).unsqueeze(1)).squeeze(1).long()
        self.slots[:num_reqs].copy_(torch.where(lens > 0, page * block_size + last % block_size, -1))
        return plan, max(after, default=0)


# The selection of a group of layers holds, per scored row, its score, two masked copies and
# a sort's values and indices (fp32 and int64), then the ascending order's mark and slot (bool,
# int64) while the sort's indices are still alive: about 48 bytes. Groups of layers stay under
# a bound, since a compaction runs outside the memory vLLM profiled at start-up.
SELECTION_ROW_BYTES = 48
SELECTION_BYTES = 256 << 20


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

    def run(self, layers: list, plan: EvictionPlan) -> None:
        """This step's compactions in every layer, after the step's forward: ``layers``
        holds ``(layer index, cache, cache format)``. Layers go together (one score, one
        selection and one move for a group of layers) in groups whose selection
        temporaries stay under :data:`SELECTION_BYTES`."""
        if not plan.compactions:
            return
        if self.scorer.window and any(index not in plan.queries for index, _, _ in layers):
            raise RuntimeError("kvcompress: a compaction that scores with the window's queries ran in a step whose "
                               "attention did not keep them (a CUDA-graph replay)")
        if self.mask_mode:
            for index, cache, fmt in layers:
                self._mask(index, cache, fmt, plan, plan.queries.get(index))
            return
        block_table, longest, targets = plan.batch()
        lengths = [c.length for c in plan.compactions]
        per_layer = len(lengths) * layers[0][1].shape[1] * longest * SELECTION_ROW_BYTES  # shape[1]: KV heads
        group = max(1, SELECTION_BYTES // max(per_layer, 1))
        for start in range(0, len(layers), group):
            chunk = layers[start:start + group]
            scores = self.scorer.score_layers(chunk, block_table, longest, lengths, plan.queries)
            keep = keep_indices_batch(scores, targets, self.sink, self.recent)
            ops.compact_layers([cache for _, cache, _ in chunk], block_table, keep, targets.keep_lens)

    def warm_up(self, layers: list) -> None:
        """Compile the compaction kernels before serving, where a first compaction would
        compile them inside a step: a move that keeps nothing in both launch plans, and,
        for scorers of keys alone, the scores of one row."""
        if self.mask_mode:
            return
        caches = [cache for _, cache, _ in layers]
        device = caches[0].device
        table = torch.zeros(1, 1, dtype=torch.int32, device=device)
        keep = torch.zeros(len(caches), 1, caches[0].shape[1], 1, dtype=torch.long, device=device)
        nothing = torch.zeros(1, dtype=torch.int32, device=device)
        for two_phase in (False, True):
            ops.compact_layers(caches, table, keep, nothing, two_phase=two_phase)
        if not self.scorer.window:
            self.scorer.score_layers(layers, table, 1, [1])

    def keep_queries(self, layer: int, plan: EvictionPlan, query: torch.Tensor) -> None:
        """The window's queries of each compacting request (copies: vLLM reuses the
        activation buffers), for :meth:`run` after the forward."""
        if self.scorer.window and plan.compactions:
            plan.queries[layer] = [self.scorer.window_queries(query, c.token_end, c.length).clone()
                                   for c in plan.compactions]

    def _mask(self, layer: int, cache: torch.Tensor, fmt, plan: EvictionPlan, queries) -> None:
        for i, c in enumerate(plan.compactions):
            keys = fmt.keys(layer, cache, plan.block_table[c.row], c.length)  # [H, T, D]
            # The rows each head still sees, in order, stand in for the compacted rows, so
            # sinks and the recent window mean the same tokens in both modes.
            mask = self.visible(c.cache, layer, c.length, keys.shape[0])
            held = mask[:, : c.length].nonzero()[:, 1].view(keys.shape[0], -1)  # [H, rows held]
            rows = keys.gather(1, held.unsqueeze(-1).expand(-1, -1, keys.shape[-1]))
            keep = held.gather(1, keep_indices(self.scorer.score(rows, queries=None if queries is None else queries[i]),
                                               c.target, self.sink, self.recent))
            mask[:, : c.length] = False
            mask.scatter_(1, keep, True)
