"""Attention glue for per-(layer, KV head) streams (HeadKV, KVzap, DMS): every stream has
its own page list in one pool shared by all layers (:mod:`vllm_kvcompress.eviction.streams`).

Plan (builder, once per step): each request is in one of three layouts, chosen by its
schedule's type and its length, and each layout plans its rows:

* :func:`native_layout`: until the compression point, vLLM's own layout (so chunked
  prefill is vLLM's); the step that ends on the point carries a compression;
* packed budgets: after a budget compression (:class:`StreamSchedule`), every stream
  appends to its :class:`~vllm_kvcompress.eviction.streams.StreamPageTable`;
* ring: after a threshold rule packed the prompt (:class:`ThresholdSchedule`), a ring of
  the newest tokens, the survivors and a spare row.

A packed request's step is one decode token; the step's packed decodes, of both kinds, are
planned together (:func:`packed_decodes`), the rest one request at a time (:func:`layout_of`).

Run (impl, every layer): write, attend, and at a compression score the prompt with the
last window's queries (SnapKV-style) and keep each stream's budget. The repack into the
packed layout writes across every layer's pages, so it runs once, after the last
layer's attention, when no layer still has to read or write this step.

KVzap scores every new token from its hidden state (a pre-hook on the layer's attention,
:mod:`vllm_kvcompress.methods.kvzap.hooks`) and keeps the scores next to the rows
(``PoolState.row_scores``, one float per pool row, moved with them). Top-k mode selects
with them at the prompt end like HeadKV; threshold mode
(:mod:`vllm_kvcompress.eviction.threshold`) packs the prompt into a ring + survivors and
then decides one leaving token per stream and step.

DMS uses the threshold layout with the keep score ``-z`` and threshold 0; its decisions
arrive one token late (each is written onto the previous token's row), and its prompt
attends under the DMS mask while it is still in vLLM's layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from vllm_kvcompress.eviction.selection import keep_indices_per_head
from vllm_kvcompress.eviction.streams import PoolGeometry, StreamPageTable, StreamSchedule, cdiv
from vllm_kvcompress.eviction.threshold import ThresholdSchedule, prompt_survivors, ring_order, ring_stream_rows
from vllm_kvcompress.kernels import ops
from vllm_kvcompress.vllm.ring_tables import RingTables


@dataclass
class StreamCompression:
    req_id: str
    cache: object  # the request's RequestCache (its packed table and survivors are set here)
    token_end: int  # end of the request's tokens in this step (its window's queries end here)
    pages: torch.Tensor  # [L, H, P] native pages
    length: int
    schedule: StreamSchedule
    blocks: torch.Tensor  # the request's block ids (a copy: the runner's host table changes)
    kept_rows: list[list[torch.Tensor]] = field(default_factory=list)  # [layer][head] source row ids
    host_pages: torch.Tensor | None = None  # ``pages`` as planned, on the host
    # Threshold rule: each layer's row scores [H, T] on the device until the repack reads them
    # back at once (L x H x T fp32: about 134 MB for a 128K-token prompt of a Llama-3-8B shape).
    prompt_scores: list[torch.Tensor] = field(default_factory=list)


@dataclass
class StreamSpan:
    token_start: int
    token_end: int
    pages: torch.Tensor  # [L, H, P]
    lengths: torch.Tensor  # [L, H] rows after this step's writes
    delayed_window: int | None = None  # delayed rule (DMS): attend under its mask (a prompt in vLLM's layout)
    # Host facts of ``lengths``, per layer: the longest stream, and whether every stream is that long.
    max_len: list[int] = field(default_factory=list)
    uniform: list[bool] = field(default_factory=list)


@dataclass
class StreamMetadata:
    num_actual_tokens: int
    write_rows: torch.Tensor  # [L, T, H] pool row of each new token in each stream
    decode_token_index: torch.Tensor | None  # [D]; None: tokens 0..D-1 (:class:`StreamDecodeBuffers`)
    decode_pages: torch.Tensor  # [L, D, H, P]
    decode_lengths: torch.Tensor  # [L, D, H]
    max_decode_len: int  # host bound on decode_lengths
    prefills: list[StreamSpan]
    compressions: list[StreamCompression]
    geometry: PoolGeometry
    step: object  # the worker's StepPlan (learned scores in, pages reports out)
    pool: object  # the worker's PoolState (row scores)
    # KVzap threshold mode, packed decode rows V: the token leaving each stream's window
    # is copied from its ring row to the spare row, then kept where its score passes.
    victim_caches: list = field(default_factory=list)
    victim_req_ids: list[str] = field(default_factory=list)
    victim_src: torch.Tensor | None = None  # [L, V, H]
    victim_dst: torch.Tensor | None = None  # [L, V, H]
    victim_kept: torch.Tensor | None = None  # [L, V, H] survivors per stream (updated in the step)
    victim_tokens: list[int] = field(default_factory=list)  # [V] each ring decode's token in the step
    # DMS (shift by one): the score computed with token ``decision_token_index[i]`` is the
    # decision of the token before it, stored at ``decision_rows[:, i]``.
    decision_token_index: torch.Tensor | None = None  # [T']
    decision_rows: torch.Tensor | None = None  # [L, T', H]
    positions: torch.Tensor | None = None  # [T] logical positions: encoded rows (kvquant) store them

    @property
    def python_only(self) -> bool:
        """Whether the step does work a replayed CUDA graph would skip: prompts and compressions
        (their shapes and host loops change every step). Ring victims and DMS decisions replay
        from the graph buffers' rows (:class:`StreamDecodeBuffers`)."""
        return bool(self.prefills or self.compressions)


class StreamDecodeBuffers:
    """A batch of single-token stream decodes in persistent device buffers (one set per
    metadata builder), so that the step can replay a CUDA graph (vLLM's FULL decode graphs):
    the builder plans the step as usual, then copies its write rows, page lists and lengths
    here, row ``r`` for token ``r``; the captured kernels read these addresses at every
    replay. Rows past the step's requests are padding (a graph's batch size): length 0,
    writes to row 0, which is vLLM's null block in layer 0 (never a request's).

    Sized for the longest stream ``max_model_len`` allows and the largest captured batch:
    ``L x max_reqs x H x cdiv(max_model_len, page)`` int32 page ids (about 1.1 GB for a
    Llama-3-8B shape at 512 requests and 34K tokens, 4.3 GB at 128K), allocated once, outside
    the KV pool vLLM profiled."""

    def __init__(self, num_layers: int, heads: int, max_reqs: int, max_len: int, page: int,
                 device: torch.device, ring: bool = False, delayed: bool = False):
        self.max_reqs = max_reqs
        self.width = cdiv(cdiv(max_len, page), 16) * 16  # the row stride the warm-up compiled (int32, 16k)
        # Every layer's slice 16-byte aligned, as Triton specialises pointers (the warm-up's).
        rows = cdiv(max_reqs, 4) * 4
        self.write_rows = torch.zeros(num_layers, rows, heads, dtype=torch.long, device=device)
        self.pages = torch.zeros(num_layers, rows, heads, self.width, dtype=torch.int32, device=device)
        self.lengths = torch.zeros(num_layers, rows, heads, dtype=torch.int32, device=device)
        # Ring layouts (KVzap threshold, DMS): the leaving token's rows and the survivor counts
        # per row, and (DMS) the row each token's score decides; a row that is no ring decode
        # moves row 0 onto itself and decides row 0 (vLLM's null block in layer 0).
        self.ring, self.delayed = ring, delayed
        if ring:
            self.victim_src, self.victim_dst, self.victim_kept = (
                torch.zeros(num_layers, rows, heads, dtype=torch.long, device=device) for _ in range(3))
        if delayed:
            self.decision_rows = torch.zeros(num_layers, rows, heads, dtype=torch.long, device=device)
            self.decision_token_index = torch.arange(rows, device=device)

    def fill(self, planned: StreamMetadata | None, num_reqs: int, geometry: PoolGeometry, step, pool,
             max_len: int) -> StreamMetadata:
        """``planned``: the step's plan (:func:`build`) of its first requests, every one a
        single-token decode; None on graph capture and dummy runs (every row padding).
        ``max_len``: the host bound the eager launches use (a capture's ``max_model_len``)."""
        real = 0
        if planned is not None:
            if planned.python_only:
                raise RuntimeError("kvcompress: a stream step with prompts, compressions or ring decisions cannot "
                                   "use the CUDA graph buffers")
            real = planned.write_rows.shape[1]
            width = planned.decode_pages.shape[-1]
            if width > self.width:
                raise RuntimeError(f"kvcompress: a stream of {width} pages is longer than max_model_len allows "
                                   f"({self.width} pages)")
            self.write_rows[:, :real].copy_(planned.write_rows)
            index = planned.decode_token_index
            self.pages[:, :, :, :width].index_copy_(1, index, planned.decode_pages.to(torch.int32))
            self.lengths.index_copy_(1, index, planned.decode_lengths.to(torch.int32))
            max_len = planned.max_decode_len
        self.write_rows[:, real:num_reqs].zero_()
        self.lengths[:, real:num_reqs].zero_()
        ring = self._fill_ring(planned, num_reqs, step) if self.ring else {}
        return StreamMetadata(**ring,
            num_actual_tokens=num_reqs,
            write_rows=self.write_rows[:, :num_reqs],
            decode_token_index=None,
            decode_pages=self.pages[:, :num_reqs],
            decode_lengths=self.lengths[:, :num_reqs],
            max_decode_len=max_len,
            prefills=[],
            compressions=[],
            geometry=geometry,
            step=step,
            pool=pool,
        )

    def _fill_ring(self, planned: StreamMetadata | None, num_reqs: int, step) -> dict:
        """The ring fields of the step in rows (token ``r``: row ``r``); each ring request's
        survivor counts, which the forward updates in place, are reported from its row here."""
        for buffer in (self.victim_src, self.victim_dst, self.victim_kept) + \
                ((self.decision_rows,) if self.delayed else ()):
            buffer[:, :num_reqs].zero_()
        if planned is not None and planned.victim_src is not None:
            tokens = ops.to_device(torch.tensor(planned.victim_tokens, dtype=torch.long), self.victim_src.device)
            self.victim_src.index_copy_(1, tokens, planned.victim_src)
            self.victim_dst.index_copy_(1, tokens, planned.victim_dst)
            self.victim_kept.index_copy_(1, tokens, planned.victim_kept)
            for v, token in enumerate(planned.victim_tokens):
                step.kept_pending[planned.victim_req_ids[v]] = (planned.victim_caches[v], self.victim_kept[:, token])
        if planned is not None and planned.decision_rows is not None:
            if not self.delayed:
                raise RuntimeError("kvcompress: DMS decisions in a ring engine that is not delayed")
            self.decision_rows.index_copy_(1, planned.decision_token_index, planned.decision_rows)
        fields = dict(victim_src=self.victim_src[:, :num_reqs], victim_dst=self.victim_dst[:, :num_reqs],
                      victim_kept=self.victim_kept[:, :num_reqs])
        if self.delayed:
            fields.update(decision_rows=self.decision_rows[:, :num_reqs],
                          decision_token_index=self.decision_token_index[:num_reqs])
        return fields


def _native_pages(geometry: PoolGeometry, blocks: torch.Tensor, length: int) -> torch.Tensor:
    """[L, H, cdiv(length, page)] pages of a request still in vLLM's layout."""
    g = geometry
    j = torch.arange(cdiv(length, g.page))
    block = blocks.long()[j // g.subpages]
    layer = torch.arange(g.num_layers)[:, None, None]
    head = torch.arange(g.heads)[None, :, None]
    return ((layer * g.num_blocks + block) * g.heads + head) * g.subpages + j % g.subpages


def packed_table(geometry: PoolGeometry, lengths, blocks, schedule) -> StreamPageTable:
    """A request's packed layout for streams of ``lengths`` rows in its ``blocks``
    (``RequestCache.stream_table``)."""
    return StreamPageTable.packed(lengths, schedule.page, geometry, blocks, schedule.pages_per_block)


def rows_at(pages: torch.Tensor, positions: torch.Tensor, page: int) -> torch.Tensor:
    """Pool rows of stream positions ``positions[..., n]`` in streams of ``pages[..., P]``
    (what ``ops.page_rows(pages, page).gather(-1, positions)`` gives, without every row)."""
    return pages.gather(-1, positions.div(page, rounding_mode="floor")) * page + positions % page


def _pad_pages(pages: list[torch.Tensor]) -> list[torch.Tensor]:
    """Page tables ``[..., P_i]`` padded to the widest, each with its streams' first page."""
    width = max(p.shape[-1] for p in pages)
    return [p if p.shape[-1] == width else torch.cat([p, p[..., :1].expand(*p.shape[:-1], width - p.shape[-1])], dim=-1)
            for p in pages]


@dataclass
class RowPlan:
    """One request's part of the step in its layout: its pages and lengths after the
    step's writes, the row each new token takes, and what the step must do after."""

    pages: torch.Tensor  # [L, H, P]
    lengths: torch.Tensor  # [L, H]
    positions: torch.Tensor  # [L, H, q] row of each new token in each stream
    compression: StreamCompression | None = None  # the step ends on the compression point


def native_layout(g: PoolGeometry, blocks, after: int, q_len: int, schedule, cache, req_id: str,
                  token_end: int) -> RowPlan:
    """Until the compression point: vLLM's own layout (so chunked prefill is vLLM's)."""
    pages = _native_pages(g, blocks, after)
    lengths = torch.full((g.num_layers, g.heads), after, dtype=torch.long)
    compression = None
    if schedule is not None and schedule.compacts_at(after):
        compression = StreamCompression(req_id, cache, token_end, pages, after, schedule,
                                        blocks.to(torch.long, copy=True))
    return RowPlan(pages, lengths, _appended(lengths, q_len), compression)


def grow_budget_table(table: StreamPageTable, schedule: StreamSchedule, after: int, blocks) -> None:
    """A budget layout's table grown to ``after`` logical tokens from where it last was (the
    packing, at first), one growth at a time (at each, the streams that start a page take one,
    in stream order): the order :attr:`StreamSchedule.slot_form` describes, so the device plan
    (:func:`budget_decodes`) finds the pages where the host put them, also after a step of
    several tokens (a resumed request recomputing its output). Only the growths that take pages
    touch the table. The device plan leaves the table behind (no host work per decode); a host
    plan of the request catches it up here first. ``blocks``: the request's block ids now (its
    list only grows while it is packed, so earlier growths find their blocks in it)."""
    start = schedule.compress_at if table.grown_to is None else table.grown_to
    for logical in range(start + 1, after + 1):
        if schedule.pages(logical) != schedule.pages(logical - 1):
            table.grow(schedule.kept_rows + (logical - schedule.compress_at), blocks)
            blocks = None  # taken by the first growth; a long catch-up converts them once
    table.grown_to = max(start, after)


def packed_budget_layout(g: PoolGeometry, blocks, after: int, q_len: int, schedule: StreamSchedule, cache,
                         req_id: str, token_end: int) -> RowPlan:
    """After a budget compression (HeadKV, KVzap top-k): every stream appends its tokens."""
    lengths = (schedule.kept_rows + (after - schedule.compress_at)).view(g.num_layers, -1)
    grow_budget_table(cache.stream_table, schedule, after, blocks)
    pages = cache.stream_table.pages().view(g.num_layers, g.heads, -1)
    return RowPlan(pages, lengths, _appended(lengths, q_len))


@dataclass
class PackedDecode:
    """A packed request's single-token decode (budget or ring layout), planned with the
    step's others by :func:`packed_decodes`."""

    token: int  # its token's index in the step
    after: int  # logical length after the step
    schedule: object  # StreamSchedule | ThresholdSchedule
    cache: object  # RequestCache (its stream table grows here)
    blocks: torch.Tensor  # its block ids (host)
    req_id: str
    row: int = 0  # its row of the step's block table (on the device: the closed form reads it there)


@dataclass
class PackedDecodes:
    """The step's packed single-token decodes, planned together: a few tensor operations for
    the batch instead of a dozen per request (with 256 streams each, per-request planning
    was the host's main cost of a stream step)."""

    tokens: list[int]
    pages: torch.Tensor  # [L, D, H, P]
    lengths: torch.Tensor  # [L, D, H] rows after the step's write
    writes: torch.Tensor  # [L, D, H] each new token's row
    longest: int  # the longest stream after the step (a host bound on ``lengths``)
    on_device: bool = False  # planned on the pool's device (the rest on the host)
    ring: list = field(default_factory=list)  # the ring layouts (threshold rules) among them, as V ...
    victim_src: torch.Tensor | None = None  # [L, V, H] ... the row of the token leaving each stream's window
    victim_dst: torch.Tensor | None = None  # [L, V, H] ... and the spare row it goes to first
    kept: torch.Tensor | None = None  # [L, V, H] ... their survivors per stream before the step
    decision_tokens: list[int] = field(default_factory=list)  # DMS (decides one token late): its tokens ...
    decision_rows: torch.Tensor | None = None  # [L, V', H] ... and the previous token's row each decides


def packed_decodes(g: PoolGeometry, decodes: list[PackedDecode], device: torch.device | str = "cpu",
                   block_table: torch.Tensor | None = None, ring_tables: RingTables | None = None) -> PackedDecodes:
    """Budget layouts append the new token to every stream (row ``length - 1``); ring layouts
    write it over the ring row of the token leaving the window (``(after - 1) % ring``), whose
    row is first copied to the spare row (``ring + kept``; :class:`StreamRunner`). Ring layouts
    are planned on ``ring_tables``' device (:func:`ring_decodes`). On a device other than the
    CPU (CUDA; ``meta`` in ``benchmarks.stream_plan``) budget layouts are planned there too
    (:func:`budget_decodes`, from the step's ``block_table`` on the device); otherwise their
    page table is made on the host for ``device`` (pinned for a CUDA one)."""
    device = torch.device(device)
    budgets = [d for d in decodes if not isinstance(d.schedule, ThresholdSchedule)]
    rings = [d for d in decodes if isinstance(d.schedule, ThresholdSchedule)]
    parts = []
    if budgets:
        parts.append(budget_decodes(g, budgets, block_table) if device.type != "cpu" and block_table is not None
                     else _host_budget_decodes(g, budgets, device))
    if rings:
        if ring_tables is None:
            raise RuntimeError("kvcompress: ring layouts are planned with the pool's ring tables (none given)")
        parts.append(ring_decodes(g, rings, ring_tables))
    return parts[0] if len(parts) == 1 else _joined(*parts)


def _host_budget_decodes(g: PoolGeometry, decodes: list[PackedDecode], device: torch.device) -> PackedDecodes:
    lengths = []
    for d in decodes:
        schedule = d.schedule
        lengths.append(schedule.kept_rows + (d.after - schedule.compress_at))
        grow_budget_table(d.cache.stream_table, schedule, d.after, d.blocks)
    width = max(int(d.cache.stream_table.counts.max()) for d in decodes)
    count, layers, heads = len(decodes), g.num_layers, g.heads
    # Stacked straight into [L, D, H, W]: one copy of the batch's tables, into memory the copy
    # to the device reads from.
    pages = ops.host_empty((layers, count, heads, width), torch.long, device)
    np.stack([d.cache.stream_table.padded(width).reshape(layers, heads, width) for d in decodes], axis=1,
             out=pages.numpy())
    lengths = torch.stack(lengths).view(count, layers, heads).transpose(0, 1).contiguous()  # [L, D, H]
    writes = rows_at(pages, (lengths - 1)[..., None], g.page)[..., 0]
    return PackedDecodes([d.token for d in decodes], pages, lengths, writes, int(lengths.max()))


def ring_decodes(g: PoolGeometry, decodes: list[PackedDecode], tables: RingTables) -> PackedDecodes:
    """Ring layouts' decodes, planned on ``tables``' device: each request's table row grows by
    the pages its survivors need (:meth:`RingTables.grow`), then one gather takes the batch's
    tables and the rows of the step's writes, leaving tokens and DMS decisions come from them
    there. The host sends ``O(batch)`` numbers and the few new pages, not the tables."""
    layers, heads, page = g.num_layers, g.heads, g.page
    for d in decodes:
        if d.cache.ring_row is None or d.cache.ring_row[0] is not tables:  # its first packed decode
            d.cache.ring_row = (tables, tables.add(d.cache.stream_table))
    count = len(decodes)
    rows = np.array([d.cache.ring_row[1] for d in decodes], dtype=np.int64)
    kept = torch.stack([d.cache.kept for d in decodes]).view(count, -1)  # [D, S] survivors before the step
    ring = np.array([d.schedule.ring for d in decodes], dtype=np.int64)
    after = np.array([d.after for d in decodes], dtype=np.int64)
    stream_rows = ring_stream_rows(ring[:, None], kept.numpy())
    num_blocks = np.array([len(d.blocks) for d in decodes])
    blocks = np.zeros((count, num_blocks.max()), dtype=np.int64)
    for i, d in enumerate(decodes):
        blocks[i, : num_blocks[i]] = d.blocks
    tables.grow(rows, stream_rows, blocks, num_blocks, page, decodes[0].schedule.pages_per_block)
    width = int(tables.counts[rows].max())
    device = tables.device
    pages = tables.pages(ops.to_device(torch.from_numpy(rows), device), width)
    pages = pages.view(count, layers, heads, width).transpose(0, 1).contiguous()  # [L, D, H, W]
    kept = ops.to_device(kept.view(count, layers, heads).transpose(0, 1).contiguous(), device)  # [L, D, H]
    # Per request: rows beside the survivors, the ring row the new token takes, the previous token's.
    per_request = ops.to_device(torch.from_numpy(np.stack([ring_stream_rows(ring, 0), (after - 1) % ring,
                                                           (after - 2) % ring])),
                                device)[:, None, :, None].expand(-1, layers, -1, heads)
    lengths = kept + per_request[0]
    # One gather for every position: the lookups of a stream share its page list.
    found = rows_at(pages, torch.stack([per_request[1], lengths - 1, per_request[2]], dim=-1), page)
    writes, spare = found[..., 0], found[..., 1]
    delayed = [i for i, d in enumerate(decodes) if d.schedule.delayed]
    decision_rows = found[..., 2] if len(delayed) == count else \
        found[..., 2].index_select(1, ops.to_device(torch.tensor(delayed, dtype=torch.long), device))
    return PackedDecodes([d.token for d in decodes], pages, lengths, writes, int(stream_rows.max()), on_device=True,
                         ring=list(decodes), victim_src=writes, victim_dst=spare, kept=kept,
                         decision_tokens=[decodes[i].token for i in delayed], decision_rows=decision_rows)


def _joined(first: PackedDecodes, second: PackedDecodes) -> PackedDecodes:
    """Two plans of one step's decodes (budgets, then rings) as one, on the device of either
    that was planned on the device."""
    on_device = first if first.on_device else second
    device = on_device.pages.device

    def cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([ops.to_device(a, device), ops.to_device(b, device)], dim=1)

    pages = _pad_pages([ops.to_device(first.pages, device), ops.to_device(second.pages, device)])
    return PackedDecodes(first.tokens + second.tokens, torch.cat(pages, dim=1), cat(first.lengths, second.lengths),
                         cat(first.writes, second.writes), max(first.longest, second.longest),
                         first.on_device or second.on_device, ring=second.ring, victim_src=second.victim_src,
                         victim_dst=second.victim_dst, kept=second.kept, decision_tokens=second.decision_tokens,
                         decision_rows=second.decision_rows)


def budget_decodes(g: PoolGeometry, decodes: list[PackedDecode], block_table: torch.Tensor) -> PackedDecodes:
    """:func:`packed_decodes` of budget layouts, planned on ``block_table``'s device: each page
    is a pure function of its stream's budget and the logical length
    (:attr:`StreamSchedule.slot_form`), so the host sends ``O(batch)`` numbers instead of the
    ``[L, D, H, P]`` table (tens of MB at B=320). The result equals the host plan's (tested).
    The host tables are left as they are: growing them here cost ~60 us per request and step
    (most steps start a page in some stream), 19 of the 24 ms a B=320 plan took on the H200's
    host. A later host plan of the request catches its table up (:func:`grow_budget_table`)."""
    device, page, layers, heads = block_table.device, g.page, g.num_layers, g.heads
    growth, longest = [], 0
    for d in decodes:
        schedule = d.schedule
        if d.cache.device_form is None:  # uploaded once per request: [4 * S + page]
            form, residue = schedule.slot_form
            d.cache.device_form = ops.to_device(torch.from_numpy(np.concatenate([form.ravel(), residue])), device)
        grown = d.after - schedule.compress_at
        growth.append(grown)
        longest = max(longest, schedule.longest_kept + grown)
    width = cdiv(longest, page)
    streams = decodes[0].schedule.streams
    forms = torch.stack([d.cache.device_form for d in decodes])  # [D, 4 * S + page]
    growth_d = ops.to_device(torch.tensor(growth), device)[:, None, None]  # [D, 1, 1]
    rows = ops.to_device(torch.tensor([d.row for d in decodes]), device)
    kept, first, prefix, rank = (part[..., None] for part in forms[:, : 4 * streams].view(-1, 4, streams).unbind(1))
    residue = forms[:, 4 * streams:]  # [D, page]
    count = -(-(kept + growth_d) // page)  # [D, S, 1] each
    j = torch.arange(width, device=device)
    before = (j * page - kept).clamp_(min=0)  # g_j - 1, the growth just before page j was taken
    taken = residue.gather(1, (before % page).flatten(1)).view_as(before) + streams * (before // page)
    slots = torch.where(j < first, prefix + j, taken + rank)
    slots = torch.where(j < count, slots, slots[..., :1])  # padding: the stream's first page
    pages_per_block = decodes[0].schedule.pages_per_block
    blocks = block_table[rows].long().gather(1, (slots // pages_per_block).flatten(1)).view_as(slots)
    ids = g.block_pages(blocks, slots, pages_per_block)  # [D, S, W]
    lengths = kept[..., 0] + growth_d[..., 0]  # [D, S]
    last = lengths - 1
    writes = ids.gather(-1, (last // page)[..., None])[..., 0] * page + last % page
    count_d = len(decodes)

    def batch_major(x: torch.Tensor) -> torch.Tensor:  # [D, S, ...] -> [L, D, H, ...]
        return x.view(count_d, layers, heads, *x.shape[2:]).transpose(0, 1).contiguous()

    return PackedDecodes([d.token for d in decodes], batch_major(ids), batch_major(lengths), batch_major(writes),
                         longest, on_device=True)


def layout_of(schedule, computed: int):
    """The layout of a request that is not a packed single-token decode, before this step."""
    if schedule is None or not schedule.packed(computed):
        return native_layout
    return packed_budget_layout


def _appended(lengths: torch.Tensor, q_len: int) -> torch.Tensor:
    return lengths[:, :, None] - q_len + torch.arange(q_len)  # [L, H, q]


def build(m, num_reqs: int, geometry: PoolGeometry, step, pool, seq_lens: torch.Tensor) -> StreamMetadata | None:
    """The step's plan on the host (``seq_lens``: logical lengths after the step, host),
    then one copy of its index tensors to the pool's device: attention reads them there,
    with host bounds for the launch sizes, so no layer reads the device back."""
    if step is None or len(step.req_ids) < num_reqs:
        return None
    starts = m.query_start_loc_cpu[: num_reqs + 1].tolist()
    seq_lens = seq_lens[:num_reqs].tolist()
    host_table = step.host_block_table
    table_rows = (host_table if host_table is not None else m.block_table_tensor.cpu())[:num_reqs]
    schedules = step.schedules
    writes = torch.empty(geometry.num_layers, starts[num_reqs], geometry.heads, dtype=torch.long)  # [L, T, H]
    decode_tokens, decode_pages, decode_lengths, prefills, compressions = [], [], [], [], []  # pages: [L, n, H, P] chunks
    decision_tokens, decision_rows = [], []
    packed: list[PackedDecode] = []
    for r in range(num_reqs):
        q_len, after = starts[r + 1] - starts[r], seq_lens[r]
        if q_len == 0:
            continue
        schedule, req_id, cache = schedules[r], step.req_ids[r], step.caches[r]
        needed = cdiv(schedule.rows_during(after - q_len, after) if schedule else after, geometry.block_size)
        blocks = table_rows[r, :needed]
        threshold = isinstance(schedule, ThresholdSchedule)
        if schedule is not None and schedule.packed(after - q_len):
            if q_len == 1:
                packed.append(PackedDecode(starts[r], after, schedule, cache, blocks, req_id, r))
                continue
            if threshold:
                raise RuntimeError(f"ring layout: request {req_id} got {q_len} tokens in one step after its "
                                   "prompt was packed")
        layout = layout_of(schedule, after - q_len)
        row = layout(geometry, blocks, after, q_len, schedule, cache, req_id, starts[r + 1])
        if row.compression is not None:
            compressions.append(row.compression)
        writes[:, starts[r]:starts[r + 1]] = rows_at(row.pages, row.positions, geometry.page).permute(0, 2, 1)
        native_delayed = threshold and schedule.delayed  # a DMS prompt still in vLLM's layout
        if native_delayed:
            tokens, rows_prev = _previous_rows(row.pages, geometry.page, after, q_len)
            decision_tokens.append(starts[r] + tokens)
            decision_rows.append(rows_prev)
        if q_len == 1 and not (native_delayed and schedule.masks_decode(after)):
            decode_tokens.append(starts[r])
            decode_pages.append(row.pages[:, None])
            decode_lengths.append(row.lengths[:, None])
        else:
            prefills.append(StreamSpan(starts[r], starts[r + 1], row.pages, row.lengths,
                                       schedule.ring if native_delayed else None))
    victim_fields = {}
    device = m.block_table_tensor.device
    longest_decode = max((int(lengths.max()) for lengths in decode_lengths), default=0)  # host bounds
    planned_on_device = None  # packed decodes planned on the device: their write rows go in after the copy
    if packed:
        if pool.ring_tables is None:
            pool.ring_tables = RingTables(geometry, device)
        plan = packed_decodes(geometry, packed, device, m.block_table_tensor, pool.ring_tables)
        longest_decode = max(longest_decode, plan.longest)
        if plan.on_device:
            planned_on_device = plan
        else:
            writes[:, plan.tokens] = plan.writes
        decode_tokens += plan.tokens
        decode_pages.append(plan.pages)
        decode_lengths.append(plan.lengths)
        if plan.ring:
            victim_fields = dict(victim_req_ids=[d.req_id for d in plan.ring], victim_caches=[d.cache for d in plan.ring],
                                 victim_src=plan.victim_src, victim_dst=plan.victim_dst, victim_kept=plan.kept,
                                 victim_tokens=[d.token for d in plan.ring])
        if plan.decision_tokens:
            decision_tokens.append(torch.tensor(plan.decision_tokens, dtype=torch.long))
            decision_rows.append(plan.decision_rows)
    if planned_on_device is not None:  # the host's chunks join the device's
        decode_pages = [ops.to_device(p, device) for p in decode_pages]
        decode_lengths = [ops.to_device(p, device) for p in decode_lengths]
    if decode_pages:  # one chunk (every decode packed): no copy
        decode_pages_t = torch.cat(_pad_pages(decode_pages), dim=1) if len(decode_pages) > 1 else decode_pages[0]
        decode_lengths_t = torch.cat(decode_lengths, dim=1) if len(decode_lengths) > 1 else decode_lengths[0]
    else:
        decode_pages_t = torch.zeros(geometry.num_layers, 0, geometry.heads, 1, dtype=torch.long)
        decode_lengths_t = torch.zeros(geometry.num_layers, 0, geometry.heads, dtype=torch.long)
    if decision_tokens:
        victim_fields.update(decision_token_index=ops.to_device(torch.cat(decision_tokens), device),
                             decision_rows=torch.cat([ops.to_device(rows, device) for rows in decision_rows], 1))
    for span in prefills:
        longest = span.lengths.amax(dim=1)
        span.max_len, span.uniform = longest.tolist(), (span.lengths == longest[:, None]).all(dim=1).tolist()
        span.pages, span.lengths = ops.to_device(span.pages, device), ops.to_device(span.lengths, device)
    for c in compressions:
        c.host_pages, c.pages = c.pages, ops.to_device(c.pages, device)
    victim_fields = {name: ops.to_device(value, device) if isinstance(value, torch.Tensor) else value
                     for name, value in victim_fields.items()}
    for v, cache in enumerate(victim_fields.get("victim_caches", ())):  # read back after the forward
        _record_kept(step, victim_fields["victim_req_ids"][v], cache, victim_fields["victim_kept"][:, v])
    write_rows = ops.to_device(writes, device)
    if planned_on_device is not None:
        tokens = ops.to_device(torch.tensor(planned_on_device.tokens, dtype=torch.long), device)
        write_rows.index_copy_(1, tokens, planned_on_device.writes)
    return StreamMetadata(
        **victim_fields,
        num_actual_tokens=m.num_actual_tokens,
        write_rows=write_rows,
        decode_token_index=ops.to_device(torch.tensor(decode_tokens, dtype=torch.long), device),
        decode_pages=ops.to_device(decode_pages_t, device),
        decode_lengths=ops.to_device(decode_lengths_t, device),
        max_decode_len=longest_decode,
        prefills=prefills,
        compressions=compressions,
        geometry=geometry,
        step=step,
        pool=pool,
    )


def _previous_rows(pages: torch.Tensor, page: int, after: int, q_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DMS, a prompt still in vLLM's layout: (offsets in the step of the request's tokens that
    carry a decision, the rows of the tokens those decisions are about ``[L, n, H]``): every new
    token but one at position 0 decides the token before it. (Packed decodes: :func:`packed_decodes`.)"""
    first = after - q_len
    previous = torch.arange(max(first - 1, 0), after - 1)  # positions decided this step
    tokens = torch.arange(q_len - len(previous), q_len)
    rows = rows_at(pages, previous.expand(*pages.shape[:-1], -1), page)  # [L, H, n]
    return tokens, rows.permute(0, 2, 1)


def pool_rows(kv_cache: torch.Tensor, layer: int, num_layers: int) -> torch.Tensor:
    """Every layer's cache as one ``[rows, 2D]`` array (vLLM allocates one backing buffer;
    layer-outermost, each layer's ``[blocks, heads, block_size, 2D]`` view contiguous)."""
    per_layer = kv_cache.numel()
    if not kv_cache.is_contiguous() or kv_cache.storage_offset() != layer * per_layer or \
            kv_cache.untyped_storage().nbytes() < num_layers * per_layer * kv_cache.element_size():
        raise NotImplementedError("kvcompress headkv needs vLLM's layer-outermost KV layout in one buffer "
                                  f"(layer {layer}: offset {kv_cache.storage_offset()}, {per_layer} elements)")
    width = kv_cache.shape[-1]
    return torch.as_strided(kv_cache, (num_layers * per_layer // width, width), (width, 1), 0)


UNDECIDED = 3.0e38  # the newest token's DMS keep score until the next token decides (kept meanwhile)


class StreamRunner:
    """One per attention layer (HeadKV, KVzap, DMS). Scores come from the method's scorer
    (keys and window queries) or, for learned methods (no scorer), from the pool's row
    scores, written from the hooks' step scores; a threshold rule decides survivors.
    ``rows``: the cache format. Dense rows are ``[key | value]``; an encoding format
    (kvquant) writes its rows with the step's positions and decodes them as they are gathered."""

    def __init__(self, method, layer: int, num_layers: int, rows=None):
        self.scorer = method.scorer()
        rule = method.rule()
        self.threshold = None if rule is None else rule.threshold
        self.delayed = rule is not None and rule.delayed  # shift by one: scores arrive with the next token
        self.layer, self.num_layers = layer, num_layers
        self.encode = getattr(rows, "encode", None)
        self.decoder = rows.stream_decoder(layer) if hasattr(rows, "stream_decoder") else None

    def _write(self, pool, rows, key, value, meta: StreamMetadata) -> None:
        if self.encode is None:
            ops.stream_write_rows(pool, rows, key, value)
            return
        if meta.positions is None:
            raise RuntimeError("kvcompress: encoded stream rows need the step's positions (none were planned)")
        pool[rows] = self.encode(self.layer, key, value, meta.positions[: key.shape[0]])

    def forward(self, query, key, value, kv_cache, meta: StreamMetadata, out, scale: float) -> None:
        pool = pool_rows(kv_cache, self.layer, self.num_layers)
        layer, page = self.layer, meta.geometry.page
        if meta.pool.adjust_query is not None:  # DMS single-neuron: the decision channel stays out of q . k
            query = meta.pool.adjust_query(query)
        scores = meta.pool.row_scores if self.scorer is None else None
        if meta.victim_src is not None:  # before the new tokens take their ring rows
            src, dst = meta.victim_src[layer], meta.victim_dst[layer]
            pool[dst] = pool[src]
            scores[dst] = scores[src]
        self._write(pool, meta.write_rows[layer], key, value, meta)
        if self.scorer is None:
            buffers = meta.pool.score_buffers
            step_scores = (meta.step.token_scores.pop(layer) if buffers is None else buffers[layer])[
                : meta.num_actual_tokens]
            if self.delayed:
                # index_fill_ passes the value as a kernel argument; ``scores[rows] = UNDECIDED``
                # would copy it from the host, a synchronizing copy on CUDA.
                scores.index_fill_(0, meta.write_rows[layer].reshape(-1), UNDECIDED)
                if meta.decision_rows is not None:
                    scores[meta.decision_rows[layer]] = step_scores[meta.decision_token_index]
            else:
                scores[meta.write_rows[layer]] = step_scores
        if meta.decode_pages.shape[1]:
            idx = slice(0, meta.decode_pages.shape[1]) if meta.decode_token_index is None else meta.decode_token_index
            result = ops.stream_decode(query[idx], pool, meta.decode_pages[layer], meta.decode_lengths[layer], page,
                                       scale, meta.max_decode_len, self.decoder)
            out[idx] = result.to(out.dtype)
        for span in meta.prefills:
            rows = slice(span.token_start, span.token_end)
            rule = None if span.delayed_window is None else ops.DelayedRule(scores, span.delayed_window,
                                                                            self.threshold)
            result = ops.stream_prefill(query[rows], pool, span.pages[layer], span.lengths[layer], page, scale,
                                        None, span.max_len[layer], span.uniform[layer], self.decoder, rule)
            out[rows] = result.to(out.dtype)
        if meta.victim_src is not None:  # after the attention: the leaving token was still seen
            meta.victim_kept[layer] += (scores[meta.victim_dst[layer]] >= self.threshold).long()
        for c in meta.compressions:
            self._select(pool, query, c, meta.pool.row_scores)
        if layer == self.num_layers - 1:
            for c in meta.compressions:
                _repack(pool, c, meta.geometry, meta.pool.row_scores, meta.step)

    def _select(self, pool, query, c: StreamCompression, row_scores) -> None:
        rows = ops.page_rows(c.pages[self.layer], c.schedule.page)[:, : c.length]  # [H, T]
        heads = rows.shape[0]
        if isinstance(c.schedule, ThresholdSchedule):  # its survivors are chosen at the repack
            c.prompt_scores.append(row_scores[rows])
            return
        if self.scorer is None:
            scores = row_scores[rows]
        else:
            head_dim = query.shape[-1]
            keys = pool[rows] if self.decoder is None else self.decoder(pool[rows])
            scores = self.scorer.score(keys[..., :head_dim].to(query.dtype),
                                       queries=self.scorer.window_queries(query, c.token_end, c.length))
        budgets = c.schedule.budgets[self.layer * heads:(self.layer + 1) * heads]
        keep = keep_indices_per_head(scores, list(budgets), 0, self.scorer.window if self.scorer else 0)
        c.kept_rows.append([rows[h, k] for h, k in enumerate(keep)])


def _record_kept(step, req_id: str, cache, kept: torch.Tensor) -> None:
    """A ring decode's survivors per stream ``[L, H]`` on the pool's device, which the forward
    updates in place (recorded when the step is planned, so a replayed CUDA graph, which runs
    no Python, leaves them too). The step reads them back once for all requests after the
    forward (``StepPlan.settle_reports``:
    the request's ``kept`` and the pages its next step needs, which the runner settles over
    the ranks and hands to the schedule and the scheduler)."""
    step.kept_pending[req_id] = (cache, kept)


def _threshold_kept_rows(c: StreamCompression) -> list[torch.Tensor]:
    """A threshold rule's packing: each stream's ring (the last tokens, in ring order), then
    the earlier tokens whose score passes, as host row ids in stream order (layer-major).
    The survivor counts set the packed layout, so this reads the scores back: once per
    packing step, for every layer."""
    scores = torch.stack(c.prompt_scores).cpu()  # [L, H, T]
    order = ring_order(c.length, c.schedule.ring)
    kept = []
    for layer, layer_scores in enumerate(scores):
        rows = ops.page_rows(c.host_pages[layer], c.schedule.page)[:, : c.length]  # [H, T]
        survivors = prompt_survivors(layer_scores, c.schedule.threshold, c.schedule.ring)
        kept += [torch.cat([rows[h, order], rows[h, keep]]) for h, keep in enumerate(survivors)]
    return kept


def _repack(pool, c: StreamCompression, geometry: PoolGeometry, row_scores, step) -> None:
    """Move every stream's kept rows into the packed layout (all layers at once)."""
    threshold = isinstance(c.schedule, ThresholdSchedule)
    if threshold:
        kept = _threshold_kept_rows(c)
    else:
        kept = [rows for layer_rows in c.kept_rows for rows in layer_rows]  # stream order (layer-major)
    spare = 1 if threshold else 0  # threshold mode: room for the next step's leaving token
    counts = torch.tensor([len(rows) for rows in kept])
    table = packed_table(geometry, counts + spare, c.blocks, c.schedule)
    # Each stream's first counts[s] rows, streams in order: the rows ``kept`` lists.
    stream = torch.repeat_interleave(torch.arange(len(kept)), counts)
    position = torch.arange(len(stream)) - (torch.cumsum(counts, 0) - counts)[stream]
    dest = torch.from_numpy(table.ids)[stream, position.div(c.schedule.page, rounding_mode="floor")] \
        * c.schedule.page + position % c.schedule.page
    source, dest = ops.to_device(torch.cat(kept), pool.device), ops.to_device(dest, pool.device)
    ops.stream_move_rows(pool, source, dest)
    if row_scores is not None:
        row_scores[dest] = row_scores[source].clone()
    c.cache.stream_table = table
    if threshold:  # the packing's counts are on the host already: reported now, not with the device's
        ring = c.schedule.ring
        step.report_kept(c.req_id, c.cache, (counts - ring).view(geometry.num_layers, -1))
