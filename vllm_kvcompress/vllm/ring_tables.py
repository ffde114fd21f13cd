"""The ring layouts' page tables (KVzap's threshold rule, DMS) kept on the pool's device.

A ring layout's streams grow by their survivors, which only the forward decides, so its
page table is not a function of the logical length (budget layouts' is:
``stream_layout.budget_decodes``). Planned on the host, a B=320 step re-sent every
request's whole table ``[L, H, W]`` (tens of MB) and grew each table in a per-request loop:
20-37 ms of host time per step, with the GPU waiting, since a ring layout schedules
synchronously. Here every request owns one row ``[streams, width]`` of one device array,
uploaded once when its first packed decode is planned, and each step sends only the
entries that changed: the pages streams take this step (a few per request), found from
host mirrors of each row's page counts and taken slots in a handful of batched NumPy
operations. Slots and page ids are the ones :meth:`StreamPageTable.grow` gives (tested
against it), so the pool rows already written stay where the table says.

Lifetime: one per pool (``PoolState.ring_tables``); a request's row is freed when the
worker drops its cache (finished, or recomputed after a preemption).
"""

from __future__ import annotations

import numpy as np
import torch

from vllm_kvcompress.eviction.streams import PoolGeometry, StreamPageTable
from vllm_kvcompress.kernels import ops


class RingTables:
    def __init__(self, geometry: PoolGeometry, device: torch.device | str):
        self.geometry, self.device = geometry, torch.device(device)
        self.streams = geometry.num_layers * geometry.heads
        # Page ids fit int32 while the pool has fewer than 2**31 pages (an 8 TB pool of
        # Llama-3-8B's shape): half the bytes of the long tables the step hands on.
        self.ids = torch.zeros((0, self.streams, 0), dtype=torch.int32, device=self.device)
        self.counts = np.zeros((0, self.streams), dtype=np.int64)  # host mirror: pages per stream
        self.used = np.zeros(0, dtype=np.int64)  # host mirror: slots each row's request has taken
        self.free: list[int] = []

    @property
    def width(self) -> int:
        return self.ids.shape[-1]

    def add(self, table: StreamPageTable) -> int:
        """A packed request's table (its packing's), uploaded once; returns its row."""
        if not self.free:
            self._more_rows()
        row = self.free.pop()
        self._widen(int(table.counts.max()))
        self.ids[row] = ops.to_device(torch.from_numpy(table.padded(self.width).astype(np.int32)), self.device)
        self.counts[row], self.used[row] = table.counts, table.used
        return row

    def release(self, row: int) -> None:
        self.free.append(row)

    def grow(self, rows: np.ndarray, stream_rows: np.ndarray, blocks: np.ndarray, num_blocks: np.ndarray,
             page: int, pages_per_block: int) -> None:
        """Give the streams of table rows ``rows[D]`` pages for ``stream_rows[D, streams]`` rows,
        as :meth:`StreamPageTable.grow` does for each (new slots in stream order, each stream's
        consecutively). ``blocks[D, n]``: each request's block ids now, its first ``num_blocks[D]``
        (the rest padding)."""
        counts = self.counts[rows]
        need = -(-stream_rows // page) - counts
        np.maximum(need, 0, out=need)
        most = int(need.max()) if need.size else 0
        if most == 0:
            return
        self._widen(int((counts + need).max()))
        first = self.used[rows][:, None] + np.cumsum(need, axis=1) - need  # each stream's first new slot
        where, pages = [], []
        for j in range(most):  # one round per page a stream takes (one, in steady decoding)
            d, s = np.nonzero(need > j)
            slot = first[d, s] + j
            if (short := slot // pages_per_block >= num_blocks[d]).any():  # the scheduler's list lags the report
                i = int(np.flatnonzero(short)[0])
                raise RuntimeError(f"kvcompress: a ring layout needs block {int(slot[i] // pages_per_block)} of a "
                                   f"request holding {int(num_blocks[d[i]])}: its pages report and its block list "
                                   "disagree")
            pages.append(self.geometry.block_pages(blocks[d, slot // pages_per_block], slot, pages_per_block))
            where.append((rows[d] * self.streams + s) * self.width + counts[d, s] + j)
        self.counts[rows] = counts + need
        self.used[rows] += need.sum(axis=1)
        where_t = ops.to_device(torch.from_numpy(np.concatenate(where)), self.device)
        pages_t = ops.to_device(torch.from_numpy(np.concatenate(pages).astype(np.int32)), self.device)
        self.ids.view(-1).index_copy_(0, where_t, pages_t)

    def pages(self, rows: torch.Tensor, width: int) -> torch.Tensor:
        """``[D, streams, width]`` page ids (long) of table rows ``rows`` (on the device); past a
        stream's count each entry repeats its first page, as the kernels expect."""
        return self.ids[rows, :, :width].long()

    def _more_rows(self) -> None:
        have = self.ids.shape[0]
        extra = max(have, 16)
        self.ids = torch.cat([self.ids, self.ids.new_zeros((extra, self.streams, self.width))])
        self.counts = np.concatenate([self.counts, np.zeros((extra, self.streams), dtype=np.int64)])
        self.used = np.concatenate([self.used, np.zeros(extra, dtype=np.int64)])
        self.free.extend(range(have + extra - 1, have - 1, -1))

    def _widen(self, width: int) -> None:
        if width <= self.width:
            return
        new = max(width, self.width + self.width // 2)  # room to grow: few reallocations
        pad = self.ids[..., :1] if self.width else self.ids.new_zeros((self.ids.shape[0], self.streams, 1))
        self.ids = torch.cat([self.ids, pad.expand(-1, -1, new - self.width)], dim=-1)
