"""The worker's eviction state, one object per lifetime (nano-vllm's ``Context`` idea):

* :class:`PoolState`, per process: the KV pool as the plugin sees it (set when vLLM
  allocates it);
* :class:`RequestCache`, per request: what the worker knows of one request's cache
  (its schedule, logical length, packed page table, survivors), dropped when the
  request finishes or is recomputed after a preemption;
* :class:`StepPlan`, per step: the batch's requests in ``input_batch`` order, the learned
  scores the hooks leave for each layer, and the pages reports the step produces; built
  by the runner before the forward and dropped after it.

:class:`WorkerState` owns all three; the runner holds it and hands it to the attention
metadata builders, which put what a step needs into the metadata they return.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from vllm_kvcompress.eviction.threshold import pages_for_batch


@dataclass
class PoolState:
    num_blocks: int = 0
    row_scores: torch.Tensor | None = None  # learned methods: one keep score per pool row, moved with the rows
    adjust_query: Callable | None = None  # a learned method's change to the query (DMS single-neuron)
    score_buffers: list | None = None  # compiled_scores methods: per layer, the step's token scores first
    ring_tables: Any = None  # ring layouts: their page tables on the pool's device (ring_tables.RingTables)


@dataclass
class RequestCache:
    schedule: Any  # CompressionSchedule | StreamSchedule | ThresholdSchedule | None
    length: int = 0  # logical tokens after the request's latest step
    masks: dict[int, torch.Tensor] = field(default_factory=dict)  # eviction_mode mask: visible rows per layer
    stream_table: Any = None  # packed streams: their StreamPageTable
    kept: torch.Tensor | None = None  # ring layout: survivors per stream [layers, KV heads]
    device_form: torch.Tensor | None = None  # budget layout on CUDA: its schedule's slot form on the device
    ring_row: tuple | None = None  # ring layout, once it decodes: (the pool's RingTables, its row there)


@dataclass
class StepPlan:
    req_ids: list[str]
    caches: list[RequestCache | None]  # batch order; None: a request without a schedule
    token_scores: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [tokens, KV heads]
    pages_reports: dict[str, int] = field(default_factory=dict)  # ring layout: pages each request needs next
    # Ring decodes: survivors per stream as the step's last layer left them (on the pool's
    # device, every one), read back together by :meth:`settle_reports` once the forward is over.
    kept_pending: dict[str, tuple[RequestCache, torch.Tensor]] = field(default_factory=dict)
    eviction: Any = None  # whole-row eviction: the step's EvictionPlan (the builder's), run after the forward
    host_block_table: torch.Tensor | None = None  # the runner's host copy of the block table (batch order)
    forced_eager: bool = False  # the runner kept this step off CUDA graphs (a stream compression in a decode batch)

    @property
    def schedules(self) -> list:
        return [None if c is None else c.schedule for c in self.caches]

    def report_kept(self, req_id: str, cache: RequestCache, kept: torch.Tensor) -> None:
        """A ring-layout request's survivors per stream ``[L, H]`` on the host: its ``kept``
        for the next plan, and the pages its next step needs."""
        cache.kept = kept
        self.pages_reports[req_id] = cache.schedule.pages_for(kept.flatten())

    def settle_reports(self) -> dict[str, int]:
        """Reports every request whose survivors wait on the pool's device (the ring decodes,
        ``kept_pending``): one read-back for the whole step, after the forward (where the host
        waits for the step anyway), none inside a layer. Returns the step's pages reports."""
        if self.kept_pending:
            req_ids = list(self.kept_pending)
            kept = torch.stack([self.kept_pending[r][1] for r in req_ids]).cpu()
            caches = [self.kept_pending[r][0] for r in req_ids]
            pages = pages_for_batch([c.schedule for c in caches], kept.flatten(1))
            for req_id, cache, counts, need in zip(req_ids, caches, kept, pages, strict=True):
                cache.kept = counts
                self.pages_reports[req_id] = need
            self.kept_pending.clear()
        return self.pages_reports


class WorkerState:
    def __init__(self):
        self.pool = PoolState()
        self.requests: dict[str, RequestCache] = {}
        self.step: StepPlan | None = None
        self.finished: list[dict] = []  # ring layouts: what each finished request kept (read by the tools)
        self.predictor_seconds = 0.0  # time in the learned methods' hooks (the overhead benchmark reads it)
        self.decode_modes: Counter[str] = Counter()  # decode steps by CUDA graph mode (FULL, PIECEWISE, NONE)

    def drop(self, req_id: str) -> RequestCache | None:
        """Forget a request's cache (finished, or to be recomputed): its ring table row is freed."""
        cache = self.requests.pop(req_id, None)
        if cache is not None and cache.ring_row is not None:
            tables, row = cache.ring_row
            tables.release(row)
        return cache

    def begin_step(self, req_ids: list[str]) -> StepPlan:
        self.step = StepPlan(list(req_ids), [self.requests.get(r) for r in req_ids])
        return self.step

    def end_step(self) -> None:
        self.step = None

    def record_scores(self, layer: int, scores: torch.Tensor, seconds: float) -> None:
        """Where the learned methods' hooks leave each layer's scores (dummy runs have no step)."""
        self.predictor_seconds += seconds
        if self.step is not None and scores is not None:  # None: they are in the pool's score buffers
            self.step.token_scores[layer] = scores
