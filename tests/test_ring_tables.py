"""Ring layouts' page tables on the pool's device (``ring_tables.RingTables``, planned by
``stream_layout.ring_decodes``): step after step of random survivors, each request's table,
write rows, spare rows and DMS decision rows must be what its own host table
(``StreamPageTable.grow``, the layout the packing and the pool rows follow) gives."""

import copy

import numpy as np
import torch

from vllm_kvcompress.eviction.streams import PoolGeometry
from vllm_kvcompress.eviction.threshold import ThresholdSchedule
from vllm_kvcompress.vllm import stream_layout
from vllm_kvcompress.vllm.ring_tables import RingTables
from vllm_kvcompress.vllm.state import RequestCache, WorkerState

LAYERS, HEADS, BLOCK, PAGE, RING = 3, 2, 16, 8, 16
STREAMS = LAYERS * HEADS
BLOCKS_EACH = 40


def _ring_request(geometry, blocks, generator, delayed: bool):
    schedule = ThresholdSchedule(compress_at=80, ring=RING, streams=STREAMS, page=PAGE, block_size=BLOCK,
                                 threshold=0.0, delayed=delayed)
    cache = RequestCache(schedule, length=80)
    cache.kept = torch.randint(0, 30, (LAYERS, HEADS), generator=generator)
    cache.stream_table = stream_layout.packed_table(geometry, schedule.stream_rows(cache.kept).flatten(), blocks,
                                                    schedule)
    return cache


def _expected(geometry, cache, host_table, after, blocks):
    """One request's plan from its own host table: pages [L, H, W], lengths, write / spare / previous rows."""
    schedule = cache.schedule
    host_table.grow(schedule.stream_rows(cache.kept).flatten(), blocks)
    width = int(host_table.counts.max())
    pages = torch.from_numpy(host_table.padded(width).copy()).view(LAYERS, HEADS, width)
    lengths = schedule.stream_rows(cache.kept)

    def row(position):
        return stream_layout.rows_at(pages, torch.as_tensor(position).expand(LAYERS, HEADS)[..., None], PAGE)[..., 0]

    return pages, lengths, row((after - 1) % RING), row(lengths - 1), row((after - 2) % RING)


def test_ring_decodes_on_device_tables_follow_the_host_tables():
    generator = torch.Generator().manual_seed(0)
    geometry = PoolGeometry(LAYERS, 6 * BLOCKS_EACH, HEADS, BLOCK, PAGE)
    table = torch.randperm(6 * BLOCKS_EACH, generator=generator).view(6, BLOCKS_EACH)
    tables = RingTables(geometry, "cpu")
    live = {}  # req_id -> (cache, host table, batch row, logical length)
    for r in range(4):
        cache = _ring_request(geometry, table[r], generator, delayed=r % 2 == 0)
        live[f"r{r}"] = (cache, copy.deepcopy(cache.stream_table), r, 80)
    widened = False
    for step in range(60):
        if step == 20:  # a request leaves; a new one takes its row (and the row's stale pages)
            cache = live.pop("r1")[0]
            tables.release(cache.ring_row[1])
            fresh = _ring_request(geometry, table[4], generator, delayed=True)
            live["r4"] = (fresh, copy.deepcopy(fresh.stream_table), 4, 80)
        if step == 40:  # a burst: one stream needs several pages at once (the general case)
            cache = live["r2"][0]
            cache.kept[1, 0] += 3 * PAGE
        width_before = tables.width
        decodes, want = [], []
        for i, (req_id, (cache, host_table, row, length)) in enumerate(live.items()):
            after = length + 1
            blocks = table[row, : -(-cache.schedule.rows_held(after) // BLOCK) + 1]
            cache.schedule.pages_next = cache.schedule.pages_for(cache.kept)
            decodes.append(stream_layout.PackedDecode(i, after, cache.schedule, cache, blocks, req_id, row))
            want.append(_expected(geometry, cache, host_table, after, blocks))
        plan = stream_layout.ring_decodes(geometry, decodes, tables)
        widened |= tables.width > width_before > 0
        assert plan.ring == decodes and plan.longest == max(int(w[1].max()) for w in want)
        delayed = [i for i, d in enumerate(decodes) if d.schedule.delayed]
        assert plan.decision_tokens == [decodes[i].token for i in delayed]
        for i, (pages, lengths, write, spare, previous) in enumerate(want):
            width = pages.shape[-1]
            assert torch.equal(plan.pages[:, i, :, :width], pages), (step, i)
            assert (plan.pages[:, i, :, width:] == pages[..., :1]).all(), (step, i)  # padding: the first page
            assert torch.equal(plan.lengths[:, i], lengths) and torch.equal(plan.kept[:, i], decodes[i].cache.kept)
            assert torch.equal(plan.writes[:, i], write) and torch.equal(plan.victim_src[:, i], write)
            assert torch.equal(plan.victim_dst[:, i], spare), (step, i)
            if i in delayed:
                assert torch.equal(plan.decision_rows[:, delayed.index(i)], previous), (step, i)
        for req_id, (cache, host_table, row, length) in list(live.items()):  # the forward's survivors
            cache.kept += (torch.rand(LAYERS, HEADS, generator=generator) < 0.4).long()
            live[req_id] = (cache, host_table, row, length + 1)
    assert widened and len(tables.free) == tables.ids.shape[0] - len(live)


def test_a_worker_frees_the_ring_row_of_a_dropped_request():
    geometry = PoolGeometry(LAYERS, BLOCKS_EACH, HEADS, BLOCK, PAGE)
    state = WorkerState()
    state.pool.ring_tables = RingTables(geometry, "cpu")
    cache = _ring_request(geometry, torch.arange(BLOCKS_EACH), torch.Generator().manual_seed(1), delayed=True)
    decode = stream_layout.PackedDecode(0, 81, cache.schedule, cache, torch.arange(BLOCKS_EACH), "r", 0)
    state.requests["r"] = cache
    stream_layout.ring_decodes(geometry, [decode], state.pool.ring_tables)
    row = cache.ring_row[1]
    assert row not in state.pool.ring_tables.free
    assert state.drop("r") is cache and row in state.pool.ring_tables.free and "r" not in state.requests
    assert state.drop("r") is None


def test_grow_takes_the_slots_the_host_table_takes():
    """``RingTables.grow`` for a batch against ``StreamPageTable.grow`` for each request."""
    generator = torch.Generator().manual_seed(2)
    geometry = PoolGeometry(LAYERS, 3 * BLOCKS_EACH, HEADS, BLOCK, PAGE)
    table = torch.randperm(3 * BLOCKS_EACH, generator=generator).view(3, BLOCKS_EACH)
    tables = RingTables(geometry, "cpu")
    hosts, rows = [], []
    for r in range(3):
        cache = _ring_request(geometry, table[r], generator, delayed=False)
        hosts.append(cache.stream_table)
        rows.append(tables.add(cache.stream_table))
    rows = np.array(rows)
    for _ in range(10):
        stream_rows = np.stack([h.counts * PAGE for h in hosts]) + \
            torch.randint(0, 2 * PAGE, (3, STREAMS), generator=generator).numpy()
        tables.grow(rows, stream_rows, table.numpy(), np.full(3, BLOCKS_EACH), PAGE, hosts[0].pages_per_block)
        for r, host in enumerate(hosts):
            host.grow(stream_rows[r], table[r])
            width = int(host.counts.max())
            assert (tables.counts[rows[r]] == host.counts).all() and tables.used[rows[r]] == host.used
            assert (tables.ids[rows[r], :, :width].numpy() == host.padded(width)).all()


def test_a_block_list_shorter_than_the_pages_is_refused():
    """A stream page past the request's blocks would land in block 0 of the padding (vLLM's null
    block): refused, naming the disagreement."""
    import pytest

    geometry = PoolGeometry(LAYERS, BLOCKS_EACH, HEADS, BLOCK, PAGE)
    cache = _ring_request(geometry, torch.arange(BLOCKS_EACH), torch.Generator().manual_seed(3), delayed=False)
    tables = RingTables(geometry, "cpu")
    row = np.array([tables.add(cache.stream_table)])
    held = -(-cache.stream_table.used // cache.stream_table.pages_per_block)
    more = np.full((1, STREAMS), int(cache.stream_table.counts.max() + 4) * PAGE)
    with pytest.raises(RuntimeError, match="pages report and its block list disagree"):
        tables.grow(row, more, np.arange(BLOCKS_EACH)[None], np.array([held]), PAGE, cache.stream_table.pages_per_block)
