"""Per-(layer, KV head) budgets in a shared paged pool: a request's *streams*.

A stream is one (layer, KV head) of a request, numbered layer-major. Memory is counted
in stream pages of ``page`` rows (one head, one layer). A vLLM block (``block_size``
rows of every layer and KV head) is ``pages_per_block = streams * block_size / page``
stream pages, so a request whose streams hold ``n_s`` pages needs
``cdiv(sum(n_s), pages_per_block)`` vLLM blocks: memory follows ``sum_s ceil(b_s / page)``,
not ``max(b_s) * streams``.

Until the prompt is compressed the cache is in vLLM's own layout ("native": row ``p``
of stream ``(l, h)`` lives in layer ``l``, head ``h`` of block ``p // block_size``).
At the compression point the kept rows are repacked ("packed"): each stream gets whole
pages in the request's first blocks, back to back; decode tokens are appended to every
stream, a new page taking the next free slot. Both sides evaluate the same pure
functions (:class:`StreamSchedule`); only the worker keeps the slot lists
(:class:`StreamPageTable`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

NEVER = 1 << 40  # "no compression point ahead"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def kv_heads_of_rank(num_kv_heads: int, tp_size: int, rank: int) -> list[int]:
    """The model's KV head indices that TP rank ``rank`` of ``tp_size`` holds: vLLM splits
    KV heads evenly over the ranks or, with more ranks than KV heads, gives each rank one
    KV head replicated on ``tp_size / num_kv_heads`` consecutive ranks."""
    if num_kv_heads >= tp_size:
        if num_kv_heads % tp_size:
            raise ValueError(f"{num_kv_heads} KV heads cannot be split over tensor_parallel_size={tp_size}")
        per_rank = num_kv_heads // tp_size
        return list(range(rank * per_rank, (rank + 1) * per_rank))
    if tp_size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size={tp_size} is not a multiple of the {num_kv_heads} KV heads")
    return [rank * num_kv_heads // tp_size]


class RankStreams:
    """The (layer, KV head) streams of the served model as one tensor-parallel rank sees
    them: budgets are set over the whole model's streams (layer-major), a schedule holds
    this rank's share plus every rank's (ranks share one block list per request, so it
    holds as many blocks as the neediest rank uses)."""

    def __init__(self, block_size: int, model=None, tp_rank: int = 0, tp_size: int = 1):
        self.block_size, self.model, self.tp_rank = block_size, model, tp_rank
        self.rank_heads = [] if model is None else [kv_heads_of_rank(model.num_kv_heads, tp_size, rank)
                                                    for rank in range(tp_size)]
        self._budgets: dict = {}

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def count(self) -> int:
        """This rank's streams."""
        return self.model.num_layers * len(self.rank_heads[self.tp_rank])

    @property
    def total(self) -> int:
        """The whole model's streams."""
        return self.model.num_layers * self.model.num_kv_heads

    def rank_budgets(self, budgets: tuple[int, ...], rank: int) -> tuple[int, ...]:
        """The budgets of the streams rank ``rank`` holds (its KV heads of every layer)."""
        heads = self.model.num_kv_heads
        return tuple(budgets[layer * heads + head] for layer in range(self.model.num_layers)
                     for head in self.rank_heads[rank])

    def cached_budgets(self, key, compute) -> tuple[int, ...]:
        """Whole-model budgets, computed once per key (every request of a budget shares them)."""
        if key not in self._budgets:
            self._budgets[key] = tuple(compute())
        return self._budgets[key]

    def budget_schedule(self, prompt_len: int, budgets: tuple[int, ...], page: int, window: int = 0):
        """A :class:`StreamSchedule`, or None when no stream has anything to evict (the
        request then stays in vLLM's layout)."""
        if min(budgets) >= prompt_len:
            return None
        ranks = tuple(self.rank_budgets(budgets, rank) for rank in range(len(self.rank_heads)))
        return StreamSchedule(compress_at=prompt_len, budgets=ranks[self.tp_rank], page=page,
                              block_size=self.block_size, window=window, rank_budgets=ranks if len(ranks) > 1 else ())


@dataclass(frozen=True)
class StreamSchedule:
    compress_at: int  # logical length of the (single) compression: the prompt end
    budgets: tuple[int, ...]  # rows kept per stream at the compression
    page: int  # rows per stream page
    block_size: int  # rows per vLLM block (of every stream)
    window: int = 0  # the step that compresses must hold the prompt's last `window` tokens
    # Tensor parallelism: every rank's budgets (its own streams). Ranks share one block
    # list per request, so it holds as many blocks as the neediest rank uses.
    rank_budgets: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self):
        if self.block_size % self.page or self.compress_at < 1 or not self.budgets:
            raise ValueError(f"invalid stream schedule {self}")

    @property
    def streams(self) -> int:
        return len(self.budgets)

    @property
    def pages_per_block(self) -> int:
        return self.streams * self.block_size // self.page

    def kept(self, budgets: tuple[int, ...] | None = None) -> list[int]:
        return [min(b, self.compress_at) for b in (budgets or self.budgets)]

    def packed(self, logical: int) -> bool:
        """Whether the cache is in the packed layout once ``logical`` tokens are computed."""
        return logical >= self.compress_at

    def stream_lengths(self, logical: int, budgets: tuple[int, ...] | None = None) -> list[int]:
        if not self.packed(logical):
            return [logical] * self.streams
        grown = logical - self.compress_at
        return [k + grown for k in self.kept(budgets)]

    @cached_property
    def kept_rows(self) -> torch.Tensor:
        """This rank's :meth:`kept` as a tensor ``[streams]`` (the worker's plans add to it)."""
        return torch.tensor(self.kept(), dtype=torch.long)

    def _residue_pages(self, budgets: tuple[int, ...]) -> tuple[int, ...]:
        # Every stream grows by the same ``g`` rows after the compression, and
        # cdiv(k + a * page + b, page) = a + cdiv(k + b, page): the sum over the streams
        # for each residue b < page gives pages(g) = table[g % page] + streams * (g // page).
        kept = self.kept(budgets)
        return tuple(sum(cdiv(k + b, self.page) for k in kept) for b in range(self.page))

    @cached_property
    def _page_tables(self) -> tuple[tuple[int, ...], ...]:
        """:meth:`_residue_pages` of this rank's budgets, then of every rank's (the scheduler
        asks for them several times per request and step: O(1) each, not O(streams))."""
        return tuple(self._residue_pages(b) for b in (self.budgets, *self.rank_budgets))

    def _pages_from(self, table: tuple[int, ...], logical: int) -> int:
        grown, streams = logical - self.compress_at, len(self.budgets)
        return table[grown % self.page] + streams * (grown // self.page)

    def pages(self, logical: int, budgets: tuple[int, ...] | None = None) -> int:
        """Stream pages in use (packed layout), of this rank or of a rank's ``budgets``."""
        if not self.packed(logical):  # every stream holds the whole prefix (the residue table is for growth)
            return self.streams * cdiv(logical, self.page)
        if budgets is None or budgets == self.budgets:
            return self._pages_from(self._page_tables[0], logical)
        return sum(cdiv(n, self.page) for n in self.stream_lengths(logical, budgets))

    @cached_property
    def slot_form(self) -> tuple[np.ndarray, np.ndarray]:
        """The packed layout's slots as a pure function of growth (design/stream-tables-on-device.md
        §2): ``[4, streams]`` int64 rows (kept rows ``k``, pages taken at the packing
        ``cdiv(k, page)``, the slots before them ``prefix``, the streams before with the same
        ``k % page`` ``rank``) and the residue table ``[page]`` (pages in use at growth ``g``:
        ``table[g % page] + streams * (g // page)``). Page ``j`` of stream ``s`` is slot
        ``prefix + j`` for ``j < first``, else ``pages(g_j - 1) + rank`` with ``g_j = j * page + 1 - k``,
        the growth at which the stream took it (:class:`StreamPageTable` takes them so)."""
        kept = np.asarray(self.kept(), dtype=np.int64)
        first = -(-kept // self.page)
        prefix = np.cumsum(first) - first
        residue = kept % self.page
        same = residue[None, :] == residue[:, None]  # [s, o]
        rank = np.tril(same, k=-1).sum(axis=1)
        return np.stack([kept, first, prefix, rank]), np.asarray(self._page_tables[0], dtype=np.int64)

    @cached_property
    def longest_kept(self) -> int:
        return max(self.kept())

    def rows_held(self, logical: int) -> int:
        """vLLM block rows a request holds once ``logical`` tokens are computed and compressed."""
        if not self.packed(logical):
            return logical
        tables = self._page_tables[1:] or self._page_tables[:1]
        pages = max(self._pages_from(table, logical) for table in tables)
        return cdiv(pages, self.pages_per_block) * self.block_size

    def rows_during(self, computed: int, total: int) -> int:
        """vLLM block rows a step from ``computed`` to ``total`` tokens needs (steps never
        cross the compression point; the one that ends on it is still native)."""
        return total if computed < self.compress_at else self.rows_held(total)

    def compacts_at(self, logical: int) -> bool:
        return logical == self.compress_at

    def next_point(self, logical: int) -> int:
        return self.compress_at if logical < self.compress_at else NEVER


@dataclass(frozen=True)
class PoolGeometry:
    """The whole KV pool seen as one array of stream pages: global page
    ``((layer * num_blocks + block) * heads + head) * pages_per_head_block + k`` holds
    rows ``k * page .. k * page + page - 1`` of that layer's head page in that block."""

    num_layers: int
    num_blocks: int
    heads: int
    block_size: int
    page: int

    @property
    def subpages(self) -> int:
        return self.block_size // self.page

    def native_page(self, layer: int, head: int, block: int, k: int) -> int:
        return ((layer * self.num_blocks + block) * self.heads + head) * self.subpages + k

    def slot_page(self, blocks: list[int], slot: int, pages_per_block: int) -> int:
        """Global page of the request's ``slot`` (slots fill its blocks in order)."""
        block = blocks[slot // pages_per_block]
        layer, rest = divmod(slot % pages_per_block, self.heads * self.subpages)
        head, k = divmod(rest, self.subpages)
        return self.native_page(layer, head, block, k)

    def slot_pages(self, blocks, slots, pages_per_block: int):
        """:meth:`slot_page` of every entry of ``slots`` (``blocks``: the request's block ids;
        numpy arrays or tensors, both of integers)."""
        return self.block_pages(blocks[slots // pages_per_block], slots, pages_per_block)

    def block_pages(self, block, slots, pages_per_block: int):
        """Global pages of ``slots`` whose blocks (``blocks[slots // pages_per_block]``) are ``block``."""
        within = slots % pages_per_block
        layer, rest = within // (self.heads * self.subpages), within % (self.heads * self.subpages)
        return ((layer * self.num_blocks + block) * self.heads + rest // self.subpages) * self.subpages \
            + rest % self.subpages


def _int64(values) -> np.ndarray:
    return (values.numpy() if isinstance(values, torch.Tensor) else np.asarray(values)).astype(np.int64)


class StreamPageTable:
    """The packed layout of one request (worker side): each stream's pages in the order they
    were taken, as slots (which index the request's blocks, :meth:`PoolGeometry.slot_pages`)
    and as global page ids. Both are ``[streams, capacity]`` arrays; past a stream's
    ``counts`` an entry repeats its first page, a valid id (the kernels' padding). NumPy, not
    torch: the plan updates a few entries per request and step, where each torch call on
    small tensors costs several microseconds of dispatch."""

    def __init__(self, page: int, geometry: PoolGeometry, blocks, pages_per_block: int, streams: int):
        self.page, self.geometry, self.pages_per_block = page, geometry, pages_per_block
        self.blocks = _int64(blocks)  # a copy: the runner's host block table changes
        self.counts = np.zeros(streams, dtype=np.int64)
        self.slots = np.zeros((streams, 0), dtype=np.int64)
        self.ids = np.zeros((streams, 0), dtype=np.int64)
        self.used = 0
        self.grown_to: int | None = None  # budget layouts: the logical length last grown to (None: the packing)

    @classmethod
    def packed(cls, lengths, page: int, geometry: PoolGeometry, blocks, pages_per_block: int) -> "StreamPageTable":
        table = cls(page, geometry, blocks, pages_per_block, len(lengths))
        table.grow(lengths)
        return table

    def grow(self, lengths, blocks=None) -> None:
        """Give every stream enough pages for ``lengths[streams]`` rows: new slots are taken
        in stream order, each stream's consecutively. ``blocks``: the request's block ids
        now (a longer list once the scheduler gave it more blocks)."""
        need = -(-_int64(lengths) // self.page) - self.counts
        np.maximum(need, 0, out=need)
        most = int(need.max()) if need.size else 0
        if most == 0:  # most steps: the blocks are converted only when a page is taken from them
            return
        if blocks is not None:
            self.blocks = _int64(blocks)
        self._reserve(int((self.counts + need).max()))
        start = self.used + np.cumsum(need) - need  # each stream's first new slot
        for j in range(most):
            streams = np.flatnonzero(need > j)
            slots = start[streams] + j
            columns = self.counts[streams] + j
            self.slots[streams, columns] = slots
            self.ids[streams, columns] = self.geometry.slot_pages(self.blocks, slots, self.pages_per_block)
        fresh = self.counts == 0  # their padding repeats the first page, known only now
        self.counts += need
        self.used += int(need.sum())
        if fresh.any():
            past = np.arange(self.slots.shape[1]) >= self.counts[:, None]
            self.slots = np.where(past, self.slots[:, :1], self.slots)
            self.ids = np.where(past, self.ids[:, :1], self.ids)

    def _reserve(self, width: int) -> None:
        capacity = self.slots.shape[1]
        if width <= capacity:
            return
        extra = max(width, 2 * capacity) - capacity  # room for twice as many pages: few regrowths
        if capacity:  # the padding repeats each stream's first page
            pad_slots, pad_ids = np.repeat(self.slots[:, :1], extra, axis=1), np.repeat(self.ids[:, :1], extra, axis=1)
        else:
            pad_slots = pad_ids = np.zeros((len(self.counts), extra), dtype=np.int64)
        self.slots = np.concatenate([self.slots, pad_slots], axis=1)
        self.ids = np.concatenate([self.ids, pad_ids], axis=1)

    def padded(self, width: int) -> np.ndarray:
        """Global page ids ``[streams, width]`` (``width`` at least every stream's count), padded
        with each stream's first page: a view, for the caller to copy (a batch's stack)."""
        self._reserve(width)
        return self.ids[:, :width]

    def pages(self) -> torch.Tensor:
        """Global page ids ``[streams, most pages]`` (padded as the kernels expect; a copy)."""
        return torch.from_numpy(self.padded(int(self.counts.max())).copy())
