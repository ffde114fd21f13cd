"""Scheduler side of eviction: vLLM's scheduler and full-attention block manager, with
blocks counted on *physical* rows (what the cache really holds after compaction).

* :class:`EvictingBlockManager` allocates ``cdiv(physical + new, block_size)`` blocks,
  and at the step after a compaction pops and frees the emptied tail blocks
  (``remove_skipped_blocks`` runs first in every ``allocate_slots``), so admission and
  preemption see them at once.
* :class:`KVCompressScheduler` records each request's
  :class:`~vllm_kvcompress.eviction.schedule.CompressionSchedule` and never lets a step
  cross a compression point, so the worker compacts at the same logical lengths
  whether a prompt arrives whole, in chunks, or again after preemption.

Logical state (``num_computed_tokens``, positions, ``max_model_len``) stays vLLM's.
The worker applies the same schedule (:mod:`vllm_kvcompress.vllm.worker`); nothing is sent
between them, except for ring layouts (KVzap threshold mode, DMS), whose survivors depend
on the learned scores: the worker reports the pages each request needs next in its
output (:class:`~vllm_kvcompress.vllm.runner_output.KVCompressRunnerOutput`).
"""

from __future__ import annotations

from vllm.logger import init_logger
from vllm.utils.math_utils import cdiv
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

from vllm_kvcompress.config import KVCompressConfig
from vllm_kvcompress.vllm.policy import EvictionPolicy, model_shape
from vllm_kvcompress.eviction.schedule import CompressionSchedule
from vllm_kvcompress.vllm.metrics import EvictionCounters
from vllm_kvcompress.vllm.runner_output import KVCompressRunnerOutput

logger = init_logger("vllm.kvcompress.scheduler")


def _whole_window(schedule, computed: int, new: int) -> int:
    """SnapKV-style scores need the queries of the prompt's last ``window`` tokens in the
    step that compresses: a chunk must not end inside that window."""
    window = getattr(schedule, "window", 0)  # a ring schedule needs no queries
    end, start_of_window = computed + new, schedule.compress_at - window
    if window and start_of_window < end < schedule.compress_at:
        # Stop before the window, or wait until one step can take all of it.
        return max(start_of_window - computed, 0)
    return new


class EvictingBlockManager(FullAttentionManager):
    """Installed on the scheduler's full-attention managers (class swap in
    :class:`KVCompressScheduler`); ``schedules`` is shared with the scheduler."""

    schedules: dict[str, CompressionSchedule | None]
    computed: dict[str, int]
    requests: dict  # the scheduler's requests by id (their schedule-time lengths)

    def _physical(self, request_id: str, num_tokens: int, computed: int) -> int:
        schedule = self.schedules.get(request_id)
        if schedule is None:
            return num_tokens
        return schedule.rows_during(computed, num_tokens)

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks, total_computed_tokens,
                                   num_local_computed_tokens, num_tokens_main_model, **kwargs):
        self.computed[request_id] = total_computed_tokens
        return super().get_num_blocks_to_allocate(
            request_id, self._physical(request_id, num_tokens, total_computed_tokens), new_computed_blocks,
            total_computed_tokens, num_local_computed_tokens,
            self._physical(request_id, num_tokens_main_model, total_computed_tokens), **kwargs)

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        computed = self.computed.get(request_id, 0)
        return super().allocate_new_blocks(request_id, self._physical(request_id, num_tokens, computed),
                                           self._physical(request_id, num_tokens_main_model, computed))

    def remove_skipped_blocks(self, request_id, processed_computed_tokens, num_prompt_tokens=None):
        schedule = self.schedules.get(request_id)
        blocks = self.req_to_blocks.get(request_id)
        if schedule is None or not blocks:
            return
        keep = cdiv(schedule.rows_held(self.cut_length(request_id, processed_computed_tokens)), self.block_size)
        if len(blocks) > keep:
            freed = blocks[keep:]
            del blocks[keep:]
            self.block_pool.free_blocks(reversed(freed))
            self.counters.blocks_reclaimed += len(freed)

    def cut_length(self, request_id: str, processed_computed_tokens: int) -> int:
        """The logical length whose rows a request keeps: its length after the last step
        already scheduled (``num_computed_tokens`` at schedule time). vLLM passes the
        processed length, which leaves out the steps still in flight; under async scheduling
        that is the length before the previous step, whose compaction (a prompt's end: all
        but 1/N of its rows) the worker runs before the step being scheduled, on the same
        stream. Cutting on the processed length would free blocks the worker still reads;
        the scheduled one frees exactly what that compaction emptied. Synchronously the two
        are equal (nothing is in flight)."""
        request = self.requests.get(request_id)
        return processed_computed_tokens if request is None else request.num_computed_tokens

    def pop_blocks_for_free(self, request_id):
        self.computed.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)


class KVCompressScheduler(Scheduler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = KVCompressConfig.from_additional_config(self.vllm_config.additional_config)
        # Rank 0's view; block counts cover every rank (see EvictionPolicy).
        self.policy = EvictionPolicy(config, self.cache_config.block_size, model_shape(self.vllm_config),
                                     tp_rank=0, tp_size=self.vllm_config.parallel_config.tensor_parallel_size)
        self.schedules: dict[str, CompressionSchedule | None] = {}
        # "mask" mode keeps every row (the reference): blocks are counted as vLLM does.
        groups = self.kv_cache_config.kv_cache_groups
        tp_size = self.vllm_config.parallel_config.tensor_parallel_size
        self.counters = EvictionCounters(
            self.vllm_config, sum(len(g.layer_names) * g.kv_cache_spec.page_size_bytes for g in groups) * tp_size)
        self.managers = self.kv_cache_manager.coordinator.single_type_managers
        for manager in self.managers if not self.policy.method.masks else []:
            if type(manager) is not FullAttentionManager:
                raise NotImplementedError(
                    f"kvcompress eviction needs full attention in every layer, got {type(manager).__name__}")
            manager.__class__ = EvictingBlockManager
            manager.schedules, manager.computed, manager.counters = self.schedules, {}, self.counters
            manager.requests = self.requests
        logger.info("kvcompress eviction scheduler: method=%s, settings %s", config.method, config.settings)

    def add_request(self, request) -> None:
        extra_args = request.sampling_params.extra_args if request.sampling_params is not None else None
        self.schedules[request.request_id] = self.policy.schedule_for(request.num_prompt_tokens, extra_args)
        super().add_request(request)

    def _reserve_prefill_lookahead(self, request, num_computed_tokens: int, num_new_tokens: int) -> int:
        # Called for every request the scheduler is about to schedule: end the step at
        # the next compression point at the latest.
        num_new_tokens = super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)
        schedule = self.schedules.get(request.request_id)
        if schedule is not None and num_new_tokens > 0:
            num_new_tokens = min(num_new_tokens, schedule.next_point(num_computed_tokens) - num_computed_tokens)
            num_new_tokens = _whole_window(schedule, num_computed_tokens, num_new_tokens)
        return num_new_tokens

    def update_from_output(self, scheduler_output, model_runner_output):
        # Ring layouts: survivors are data-dependent, so the worker reports the pages each
        # request needs for its next step; read before that step is scheduled.
        reports = model_runner_output.pages_next if isinstance(model_runner_output, KVCompressRunnerOutput) else {}
        for req_id, pages in reports.items():
            schedule = self.schedules.get(req_id)
            if schedule is not None:
                schedule.pages_next = pages
        return super().update_from_output(scheduler_output, model_runner_output)

    def _free_request(self, request, *args, **kwargs):
        self.counters.request_ended(request.num_computed_tokens, self.schedules.get(request.request_id))
        result = super()._free_request(request, *args, **kwargs)
        self.schedules.pop(request.request_id, None)
        return result

    def make_stats(self, *args, **kwargs):
        stats = super().make_stats(*args, **kwargs)
        if stats is not None:  # see vllm_kvcompress.vllm.metrics for why this dict
            blocks = self.managers[0].req_to_blocks
            running = [(r.num_computed_tokens, len(blocks.get(r.request_id, ()))) for r in self.running]
            stats.num_kv_fetch_reqs_by_stage.update(self.counters.pack(running))
        return stats


class KVCompressAsyncScheduler(KVCompressScheduler, AsyncScheduler):
    """Whole-row eviction and HeadKV's budget streams under vLLM's async scheduling (CUDA
    only): step N+1 is scheduled while step N runs. That changes nothing the eviction
    relies on. Compression points are a function of logical length, which the scheduler
    advances when it schedules a step, async or not, so both sides cut at the same points.
    The blocks freed when N+1 is scheduled were emptied by step N's compaction (HeadKV: the
    repack at the prompt end, inside step N's forward), which the worker runs before step N+1
    on the same stream, so another request writes them only after it. Ring layouts (KVzap
    threshold, DMS) are not allowed here: their worker reports would reach the scheduler a
    step late."""
