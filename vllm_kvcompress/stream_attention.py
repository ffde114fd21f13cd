"""Attention glue for per-(layer, KV head) budgets (HeadKV): every stream has its own
page list in one pool shared by all layers (:mod:`vllm_kvcompress.eviction.streams`).

Plan (builder, once per step): for each request, the pages and lengths of its
``layers x KV heads`` streams, the row every new token is written to in each stream, and
the compressions that end this step. Native requests (prompt not compressed yet) use
vLLM's layout, so chunked prefill is vLLM's; packed ones use their
:class:`~vllm_kvcompress.eviction.streams.StreamPageTable`.

Run (impl, every layer): write, attend, and at a compression score the prompt with the
last window's queries (SnapKV-style) and keep each stream's budget. The repack into the
packed layout writes across every layer's pages, so it runs once, after the last
layer's attention, when no layer still has to read or write this step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_kvcompress import step_plan
from vllm_kvcompress.eviction.scorers import scorer_for
from vllm_kvcompress.eviction.selection import keep_indices_per_head
from vllm_kvcompress.eviction.streams import PoolGeometry, StreamPageTable, StreamSchedule, cdiv
from vllm_kvcompress.kernels import stream_attention_ref as ref


@dataclass
class StreamCompression:
    req_id: str
    token_end: int  # end of the request's tokens in this step (its window's queries end here)
    pages: torch.Tensor  # [L, H, P] native pages
    length: int
    schedule: StreamSchedule
    blocks: list[int]
    kept_rows: list[list[torch.Tensor]] = field(default_factory=list)  # [layer][head] source row ids


@dataclass
class StreamSpan:
    token_start: int
    token_end: int
    pages: torch.Tensor  # [L, H, P]
    lengths: torch.Tensor  # [L, H] rows after this step's writes


@dataclass
class StreamMetadata:
    num_actual_tokens: int
    write_rows: torch.Tensor  # [L, T, H] pool row of each new token in each stream
    decode_token_index: torch.Tensor  # [D]
    decode_pages: torch.Tensor  # [L, D, H, P]
    decode_lengths: torch.Tensor  # [L, D, H]
    prefills: list[StreamSpan]
    compressions: list[StreamCompression]
    geometry: PoolGeometry


def _native_pages(geometry: PoolGeometry, blocks: torch.Tensor, length: int) -> torch.Tensor:
    """[L, H, cdiv(length, page)] pages of a request still in vLLM's layout."""
    g = geometry
    j = torch.arange(cdiv(length, g.page))
    block = blocks.long()[j // g.subpages]
    layer = torch.arange(g.num_layers)[:, None, None]
    head = torch.arange(g.heads)[None, :, None]
    return ((layer * g.num_blocks + block) * g.heads + head) * g.subpages + j % g.subpages


def _slot_pages(geometry: PoolGeometry, slots: list[int], blocks: list[int], schedule: StreamSchedule) -> list[int]:
    return [geometry.slot_page(blocks, slot, schedule.pages_per_block) for slot in slots]


def _packed_pages(geometry: PoolGeometry, table: StreamPageTable, ids: list[list[int]], blocks: list[int],
                  schedule: StreamSchedule, lengths: list[int]) -> torch.Tensor:
    table.grow(lengths)
    for stream, slots in enumerate(table.slots):  # only slots taken since the last step need ids
        ids[stream].extend(_slot_pages(geometry, slots[len(ids[stream]):], blocks, schedule))
    width = max(len(x) for x in ids)
    padded = torch.tensor([x + [x[0]] * (width - len(x)) for x in ids], dtype=torch.long)
    return padded.view(geometry.num_layers, geometry.heads, width)


def _pad_pages(pages: list[torch.Tensor]) -> list[torch.Tensor]:
    width = max(p.shape[-1] for p in pages)
    return [torch.cat([p, p[..., :1].expand(*p.shape[:-1], width - p.shape[-1])], dim=-1) for p in pages]


def build(m, num_reqs: int, geometry: PoolGeometry) -> StreamMetadata | None:
    rows = step_plan.rows
    if rows is None or len(rows) < num_reqs:
        return None
    starts = m.query_start_loc_cpu[: num_reqs + 1].tolist()
    seq_lens = m.seq_lens[:num_reqs].to("cpu").tolist()
    table_rows = m.block_table_tensor[:num_reqs].cpu()
    writes, decode_rows, decode_pages, decode_lengths, prefills, compressions = [], [], [], [], [], []
    for r in range(num_reqs):
        q_len, after = starts[r + 1] - starts[r], seq_lens[r]
        if q_len == 0:
            continue
        schedule, req_id = rows[r], step_plan.req_ids[r]
        needed = cdiv(schedule.rows_during(after - q_len, after) if schedule else after, geometry.block_size)
        blocks = table_rows[r, :needed]
        if schedule is None or not schedule.packed(after - q_len):
            pages = _native_pages(geometry, blocks, after)
            lengths = torch.full((geometry.num_layers, geometry.heads), after, dtype=torch.long)
            if schedule is not None and schedule.compacts_at(after):
                compressions.append(StreamCompression(req_id, starts[r + 1], pages, after, schedule, blocks.tolist()))
        else:
            table, ids = step_plan.stream_tables[req_id]
            lengths = torch.tensor(schedule.stream_lengths(after), dtype=torch.long).view(geometry.num_layers, -1)
            pages = _packed_pages(geometry, table, ids, blocks.tolist(), schedule, lengths.flatten().tolist())
        positions = lengths[:, :, None] - q_len + torch.arange(q_len)  # [L, H, q]
        rows_lh = ref.page_rows(pages, geometry.page).gather(2, positions)
        writes.append(rows_lh.permute(0, 2, 1))  # [L, q, H]
        if q_len == 1:
            decode_rows.append(starts[r])
            decode_pages.append(pages)
            decode_lengths.append(lengths)
        else:
            prefills.append(StreamSpan(starts[r], starts[r + 1], pages, lengths))
    if decode_pages:
        decode_pages_t = torch.stack(_pad_pages(decode_pages), dim=1)
        decode_lengths_t = torch.stack(decode_lengths, dim=1)
    else:
        decode_pages_t = torch.zeros(geometry.num_layers, 0, geometry.heads, 1, dtype=torch.long)
        decode_lengths_t = torch.zeros(geometry.num_layers, 0, geometry.heads, dtype=torch.long)
    return StreamMetadata(
        num_actual_tokens=m.num_actual_tokens,
        write_rows=torch.cat(writes, dim=1) if writes else torch.zeros(geometry.num_layers, 0, geometry.heads,
                                                                        dtype=torch.long),
        decode_token_index=torch.tensor(decode_rows, dtype=torch.long),
        decode_pages=decode_pages_t,
        decode_lengths=decode_lengths_t,
        prefills=prefills,
        compressions=compressions,
        geometry=geometry,
    )


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


class StreamRunner:
    """One per attention layer (HeadKV)."""

    def __init__(self, settings, layer: int, num_layers: int):
        self.scorer = scorer_for(settings)
        self.layer, self.num_layers = layer, num_layers

    def forward(self, query, key, value, kv_cache, meta: StreamMetadata, out, scale: float) -> None:
        pool = pool_rows(kv_cache, self.layer, self.num_layers)
        layer, page = self.layer, meta.geometry.page
        ref.write_rows(pool, meta.write_rows[layer], key, value)
        if meta.decode_token_index.numel():
            idx = meta.decode_token_index
            result = ref.decode_attention(query[idx], pool, meta.decode_pages[layer], meta.decode_lengths[layer],
                                          page, scale)
            out[idx] = result.to(out.dtype)
        for span in meta.prefills:
            rows = slice(span.token_start, span.token_end)
            result = ref.prefill_attention(query[rows], pool, span.pages[layer], span.lengths[layer], page, scale)
            out[rows] = result.to(out.dtype)
        for c in meta.compressions:
            self._select(pool, query, c)
        if layer == self.num_layers - 1:
            for c in meta.compressions:
                _repack(pool, c, meta.geometry)

    def _select(self, pool, query, c: StreamCompression) -> None:
        head_dim = query.shape[-1]
        rows = ref.page_rows(c.pages[self.layer], c.schedule.page)[:, : c.length]  # [H, T]
        keys = pool[rows][..., :head_dim]
        scores = self.scorer.score(keys, queries=self.scorer.window_queries(query, c.token_end, c.length))
        heads = rows.shape[0]
        budgets = c.schedule.budgets[self.layer * heads:(self.layer + 1) * heads]
        keep = keep_indices_per_head(scores, list(budgets), 0, self.scorer.window)
        c.kept_rows.append([rows[h, k] for h, k in enumerate(keep)])


def _repack(pool, c: StreamCompression, geometry: PoolGeometry) -> None:
    """Move every stream's kept rows into the packed layout (all layers at once)."""
    kept = [rows for layer_rows in c.kept_rows for rows in layer_rows]  # stream order (layer-major)
    table = StreamPageTable.packed([len(rows) for rows in kept], c.schedule.page)
    ids = [_slot_pages(geometry, slots, c.blocks, c.schedule) for slots in table.slots]
    dest = [ref.page_rows(torch.tensor(stream_ids), c.schedule.page)[: len(rows)] for stream_ids, rows in zip(ids, kept)]
    ref.move_rows(pool, torch.cat(kept), torch.cat(dest))
    step_plan.stream_tables[c.req_id] = (table, ids)
