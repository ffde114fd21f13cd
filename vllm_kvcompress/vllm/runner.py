"""The plugin's part of vLLM's (V1) model runner when an eviction method runs: block tables
kept physical, and the eviction state (:class:`~vllm_kvcompress.vllm.state.WorkerState`).

At the start of each step, a request whose cache was compacted at the end of an
earlier step has its block list cut to ``cdiv(physical_length, block_size)`` blocks,
the same cut the scheduler's :class:`~vllm_kvcompress.vllm.scheduler.EvictingBlockManager`
makes before it appends new blocks, so both lists stay identical. Then the runner
builds the step plan (each batch row's request cache) for the attention metadata
builders, which turn logical lengths into physical ones and plan the step's compactions.
After the forward, the runner runs those compactions in every layer (whole-row
eviction: outside the forward, so a decode step may replay a CUDA graph). After the step, the pages the
ring layouts need next travel to the scheduler in the runner's output
(:class:`KVCompressRunnerOutput`).

The same mixin serves vLLM's CPU runner (:mod:`vllm_kvcompress.vllm.worker`) and its V1 GPU
runner (:mod:`vllm_kvcompress.vllm.gpu_worker`); the CPU runner subclasses the GPU one.
"""

from __future__ import annotations

import torch
from vllm.config import get_layers_from_vllm_config
from vllm.model_executor.layers.attention.attention import Attention
from vllm.model_executor.models.utils import extract_layer_index
from vllm.utils.math_utils import cdiv

from vllm_kvcompress.config import KVCompressConfig
from vllm_kvcompress.eviction.threshold import ThresholdSchedule
from vllm_kvcompress.methods import buffered_scores
from vllm_kvcompress.methods.base import PagedSettings
from vllm_kvcompress.vllm.policy import EvictionPolicy, model_shape
from vllm_kvcompress.vllm import parallel
from vllm_kvcompress.vllm.runner_output import KVCompressRunnerOutput
from vllm_kvcompress.vllm.state import RequestCache, WorkerState

COMPACTION_RANGE = "kvcompress_compaction"


class EvictionRunnerMixin:
    def _kvc_setup(self) -> None:
        config = KVCompressConfig.from_additional_config(self.vllm_config.additional_config)
        self.kvc_rank, self.kvc_tp_size = parallel.rank_and_size()
        self.kvc_policy = EvictionPolicy(config, self.cache_config.block_size, model_shape(self.vllm_config),
                                         self.kvc_rank, self.kvc_tp_size)
        self.kvc_method = self.kvc_policy.method
        self.kvc_streams = isinstance(config.settings, PagedSettings)  # per-(layer, KV head) streams
        self.kvc = WorkerState()
        self.kvc_scores_install: int | None = None  # learned scores through buffered_scores (load_model)

    def _determine_batch_execution_and_padding(self, *args, **kwargs):
        # Only a batch of single-token decodes may replay a FULL graph; a mixed batch runs its
        # attention eagerly (PIECEWISE) anyway, so it keeps its graphs.
        decodes_only = kwargs.get("max_num_scheduled_tokens") == 1
        if decodes_only and self._kvc_step_compresses_streams():
            kwargs["force_eager"] = True
            self.kvc.step.forced_eager = True
        decision = super()._determine_batch_execution_and_padding(*args, **kwargs)
        if decodes_only and self.kvc.step is not None:
            self.kvc.decode_modes[getattr(decision[0], "name", str(decision[0]))] += 1
        return decision

    def _kvc_step_compresses_streams(self) -> bool:
        """Whether a request's stream compression runs in this step (it scores with the step's
        queries inside every layer, which a replayed decode graph would skip; whole-row
        compactions run after the forward and need no such step), or a DMS decode in vLLM's
        layout attends under a mask (built in Python; never, as prompts pack by the window)."""
        step = self.kvc.step
        return self.kvc_streams and step is not None and any(
            cache is not None and cache.schedule is not None and (
                cache.schedule.compacts_at(cache.length)
                or isinstance(cache.schedule, ThresholdSchedule) and cache.schedule.masks_decode(cache.length))
            for cache in step.caches)

    def _kvc_truncate(self, req_id: str, num_computed: int) -> None:
        cache = self.kvc.requests.get(req_id)
        state = self.requests.get(req_id)
        if cache is None or cache.schedule is None or state is None:
            return
        tables = self.input_batch.block_table.block_tables
        row = self.input_batch.req_id_to_index.get(req_id)
        for group, block_ids in enumerate(state.block_ids):
            keep = cdiv(cache.schedule.rows_held(num_computed), tables[group].block_size)
            if len(block_ids) <= keep:
                continue
            del block_ids[keep:]
            if row is not None:
                table = tables[group]
                table.block_table.np[row, keep:table.num_blocks_per_row[row]] = 0
                table.num_blocks_per_row[row] = keep

    def _update_states(self, scheduler_output):
        requests = self.kvc.requests
        # Finished requests first: vLLM may schedule a finished id again as a new request in
        # the same step, whose cache must not be the one dropped here.
        for req_id in scheduler_output.finished_req_ids:
            self._kvc_record_finished(req_id)
            self.kvc.drop(req_id)
        for request in scheduler_output.scheduled_new_reqs:
            extra_args = request.sampling_params.extra_args if request.sampling_params is not None else None
            schedule = self.kvc_policy.schedule_for(len(request.prompt_token_ids or ()), extra_args)
            self.kvc.drop(request.req_id)  # an id vLLM sends again as new: its old cache's ring row is freed
            requests[request.req_id] = RequestCache(schedule)
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, num_computed in zip(cached.req_ids, cached.num_computed_tokens):
            if req_id in cached.resumed_req_ids:  # recomputed from scratch; vLLM replaces the block list
                if (cache := self.kvc.drop(req_id)) is not None:
                    requests[req_id] = RequestCache(cache.schedule)
            elif not self.kvc_method.masks:
                self._kvc_truncate(req_id, num_computed)
        result = super()._update_states(scheduler_output)
        for req_id, scheduled in scheduler_output.num_scheduled_tokens.items():
            if (state := self.requests.get(req_id)) is not None and (cache := requests.get(req_id)) is not None:
                cache.length = state.num_computed_tokens + scheduled
        step = self.kvc.begin_step(self.input_batch.req_ids)
        # The stream layouts plan from block ids on the host: the runner's own copy, where the
        # metadata's table lives on the GPU.
        step.host_block_table = self.input_batch.block_table[0].get_cpu_tensor()
        return result

    def _kvc_record_finished(self, req_id: str) -> None:
        """Ring layouts (KVzap threshold, DMS): what a finished request really kept, for the tools."""
        cache = self.kvc.requests.get(req_id)
        # A request can pack its prompt and finish in one step (max_tokens=1): the worker's own
        # num_computed_tokens is still 0 then, so the length comes from the steps it ran.
        if cache is None or cache.kept is None or cache.schedule is None or not cache.length:
            return
        schedule, streams = cache.schedule, cache.kept.numel()
        rows = streams * schedule.ring + int(cache.kept.sum())
        self.kvc.finished.append({"request": req_id, "rank": self.kvc_rank, "tokens": cache.length,
                                  "kept_fraction": rows / (streams * cache.length), "pages": schedule.pages_next,
                                  "native_pages": streams * cdiv(cache.length, schedule.page)})

    def load_model(self, *args, **kwargs):
        super().load_model(*args, **kwargs)
        if not self.kvc_method.learned:
            return
        shape = model_shape(self.vllm_config)
        heads = parallel.kv_heads_of_rank(shape.num_kv_heads, self.kvc_tp_size, self.kvc_rank)
        max_tokens = self.vllm_config.scheduler_config.max_num_batched_tokens if self.kvc_method.compiled_scores else None
        learned = self.kvc_method.install(self.model, shape, heads, self.kvc_tp_size, self.device,
                                          self.kvc.record_scores, max_tokens)
        self.kvc.pool.adjust_query = learned.adjust_query
        self.kvc.pool.score_buffers = learned.score_buffers
        self.kvc_scores_install = learned.scores_install

    def initialize_kv_cache(self, kv_cache_config, *args, **kwargs):
        super().initialize_kv_cache(kv_cache_config, *args, **kwargs)
        self.kvc.pool.num_blocks = kv_cache_config.num_blocks
        if self.kvc_method.learned:  # one score per pool row (K and V of one token and head)
            spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
            layers = self.vllm_config.model_config.hf_text_config.num_hidden_layers
            rows = layers * kv_cache_config.num_blocks * spec.num_kv_heads * spec.block_size
            self.kvc.pool.row_scores = torch.zeros(rows, dtype=torch.float32, device=self.device)
        for group in self.attn_groups:
            for attn_group in group:
                for builder in attn_group.metadata_builders:
                    builder.worker_state = self.kvc
        layers = get_layers_from_vllm_config(self.vllm_config, Attention)
        attention = sorted(((extract_layer_index(name), layer) for name, layer in layers.items()),
                           key=lambda pair: pair[0])
        self.kvc_attention_layers = [(index, layer) for index, layer in attention
                                     if getattr(layer.impl, "evictor", None) is not None]
        if attention:
            attention[0][1].impl.warm_up_decode(attention[0][1].kv_cache)
        if self.kvc_attention_layers:
            self.kvc_attention_layers[0][1].impl.warm_up_eviction(self.kvc_attention_layers)
        elif attention and self.kvc_method.evicts:  # per-(layer, KV head) streams
            index, layer = attention[0]
            num_layers = self.vllm_config.model_config.hf_text_config.num_hidden_layers
            layer.impl.warm_up_streams(layer.kv_cache, index, num_layers, self.max_model_len)

    def execute_model(self, *args, **kwargs):
        output = None
        if self.kvc_scores_install is not None:  # this engine's scorers (another may share the process)
            buffered_scores.activate(self.kvc_scores_install)
        try:
            output = super().execute_model(*args, **kwargs)
            return output
        finally:
            if self.kvc.step is not None:
                self.kvc.step.token_scores.clear()
                if output is not None:  # no sample_tokens follows (an empty step): the step ends here
                    self._kvc_compact()
                    self.kvc.end_step()

    def _kvc_compact(self) -> None:
        """Whole-row eviction: the compactions the builder planned for this step, in every
        layer, after the forward (which may have replayed a CUDA graph) and after sampling
        read its tokens back, so the GPU compacts while the host schedules the next step."""
        plan = None if self.kvc.step is None else self.kvc.step.eviction
        if plan is None or not plan.compactions:
            return
        with torch.profiler.record_function(COMPACTION_RANGE):  # its share of a step, in a profile
            self.kvc_attention_layers[0][1].impl.evict(self.kvc_attention_layers, plan)

    def sample_tokens(self, *args, **kwargs):
        output = super().sample_tokens(*args, **kwargs)
        self._kvc_compact()
        step = self.kvc.step
        reports = {} if step is None else step.settle_reports()
        if self.kvc_tp_size > 1 and self.kvc_method.learned:
            reports = self._kvc_agree_pages(reports)
        for req_id, pages in reports.items():
            if (cache := self.kvc.requests.get(req_id)) is not None:
                cache.schedule.pages_next = pages
        self.kvc.end_step()
        if reports and output is not None:
            return KVCompressRunnerOutput.of(output, reports)
        return output

    def _kvc_agree_pages(self, reports: dict[str, int]) -> dict[str, int]:
        """Survivors differ per rank (each holds its own heads) but the block list is
        shared: every rank, and the scheduler (which hears rank 0 only), use the most
        pages any rank needs. Every rank calls this each step, in batch order."""
        req_ids = list(self.input_batch.req_ids)
        agreed = parallel.agree_max([reports.get(req_id, -1) for req_id in req_ids])
        return {req_id: pages for req_id, pages in zip(req_ids, agreed) if pages >= 0}


def install_eviction_runner(worker) -> None:
    """Give ``worker``'s model runner (made by its ``init_device``) the eviction mixin.
    vLLM's V2 runner (the CUDA default) has other block tables and no ``_update_states``:
    the plugin selects the V1 runner at start-up (``startup.wire_eviction``)."""
    if getattr(worker, "use_v2_model_runner", False):
        raise NotImplementedError("kvcompress eviction runs on vLLM's V1 model runner only; start the engine with "
                                  "VLLM_USE_V2_MODEL_RUNNER=0 (the plugin sets it when it is unset)")
    runner_cls = type(worker.model_runner)
    worker.model_runner.__class__ = type(f"KVCompress{runner_cls.__name__}", (EvictionRunnerMixin, runner_cls), {})
    worker.model_runner._kvc_setup()
