"""Worker side of eviction: vLLM's CPU worker with a model runner that keeps its block
tables physical.

At the start of each step, a request whose cache was compacted at the end of an
earlier step has its block list cut to ``cdiv(physical_length, block_size)`` blocks,
the same cut the scheduler's :class:`~vllm_kvcompress.scheduler.EvictingBlockManager`
makes before it appends new blocks, so both lists stay identical. Then the runner
publishes each batch row's schedule (:mod:`vllm_kvcompress.step_plan`) for the
attention metadata builder, which turns logical lengths into physical ones.
"""

from __future__ import annotations

import torch
from vllm.logger import init_logger
from vllm.utils.math_utils import cdiv
from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_kvcompress import parallel, step_plan
from vllm_kvcompress.config import PREDICTED_METHODS, KVCompressConfig
from vllm_kvcompress.eviction.policy import EvictionPolicy, model_shape

logger = init_logger("vllm.kvcompress.worker")


class EvictionRunnerMixin:
    def _kvc_setup(self) -> None:
        settings = KVCompressConfig.from_additional_config(self.vllm_config.additional_config)
        self.kvc_rank, self.kvc_tp_size = parallel.rank_and_size()
        self.kvc_policy = EvictionPolicy(settings, self.cache_config.block_size, model_shape(self.vllm_config),
                                         self.kvc_rank, self.kvc_tp_size)
        self.kvc_schedules = {}
        self.kvc_lengths: dict[str, int] = {}  # logical tokens after each request's latest step
        self.kvc_compact = settings.eviction_mode == "compact"
        self.kvc_settings = settings

    def _kvc_truncate(self, req_id: str, num_computed: int) -> None:
        schedule = self.kvc_schedules.get(req_id)
        state = self.requests.get(req_id)
        if schedule is None or state is None:
            return
        tables = self.input_batch.block_table.block_tables
        row = self.input_batch.req_id_to_index.get(req_id)
        for group, block_ids in enumerate(state.block_ids):
            keep = cdiv(schedule.rows_held(num_computed), tables[group].block_size)
            if len(block_ids) <= keep:
                continue
            del block_ids[keep:]
            if row is not None:
                table = tables[group]
                table.block_table.np[row, keep:table.num_blocks_per_row[row]] = 0
                table.num_blocks_per_row[row] = keep

    def _update_states(self, scheduler_output):
        for request in scheduler_output.scheduled_new_reqs:
            extra_args = request.sampling_params.extra_args if request.sampling_params is not None else None
            self.kvc_schedules[request.req_id] = self.kvc_policy.schedule_for(len(request.prompt_token_ids or ()),
                                                                              extra_args)
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, num_computed in zip(cached.req_ids, cached.num_computed_tokens):
            if req_id in cached.resumed_req_ids:  # recomputed from scratch; vLLM replaces the block list
                _forget(req_id)
            elif self.kvc_compact:
                self._kvc_truncate(req_id, num_computed)
        for req_id in scheduler_output.finished_req_ids:
            self._kvc_report_finished(req_id)
        result = super()._update_states(scheduler_output)
        for req_id in scheduler_output.finished_req_ids:
            self.kvc_schedules.pop(req_id, None)
            self.kvc_lengths.pop(req_id, None)
            _forget(req_id)
        for req_id, scheduled in scheduler_output.num_scheduled_tokens.items():
            if (state := self.requests.get(req_id)) is not None:
                self.kvc_lengths[req_id] = state.num_computed_tokens + scheduled
        step_plan.req_ids = list(self.input_batch.req_ids)
        step_plan.rows = [self.kvc_schedules.get(req_id) for req_id in step_plan.req_ids]
        return result

    def _kvc_report_finished(self, req_id: str) -> None:
        """KVzap threshold mode and DMS: what a finished request really kept (benchmarks parse this line)."""
        kept, schedule, tokens = step_plan.kept.get(req_id), self.kvc_schedules.get(req_id), self.kvc_lengths.get(req_id)
        # A request can pack its prompt and finish in one step (max_tokens=1): the worker's own
        # num_computed_tokens is still 0 then, so the length comes from the steps it ran.
        if kept is None or schedule is None or not tokens:
            return
        streams = kept.numel()
        rows = streams * schedule.ring + int(kept.sum())
        logger.info("kvcompress %s finished %s: tokens=%d kept_fraction=%.4f pages=%d native_pages=%d",
                    self.kvc_settings.method, req_id, tokens, rows / (streams * tokens), schedule.pages_next,
                    streams * cdiv(tokens, schedule.page))

    def load_model(self, *args, **kwargs):
        super().load_model(*args, **kwargs)
        hf = self.vllm_config.model_config.hf_text_config
        heads = parallel.kv_heads_of_rank(hf.num_key_value_heads, self.kvc_tp_size, self.kvc_rank)
        if self.kvc_settings.method == "kvzap":
            from vllm_kvcompress import kvzap_hooks
            from vllm_kvcompress.eviction.kvzap import load_any_predictors

            predictors = load_any_predictors(self.kvc_settings.kvzap_predictor, hf.num_hidden_layers, hf.hidden_size,
                                             hf.num_key_value_heads)
            kvzap_hooks.install(self.model, [p.to(self.device) for p in predictors], heads)
        if self.kvc_settings.method == "dms":
            from vllm_kvcompress import dms_hooks
            from vllm_kvcompress.eviction.dms_checkpoint import load_decisions

            decisions = load_decisions(self.kvc_settings.dms_adapters, hf.num_hidden_layers, hf.hidden_size,
                                       hf.num_key_value_heads, getattr(hf, "rms_norm_eps", 1e-6))
            decisions.adapters = [a.to(self.device) for a in decisions.adapters]
            decisions.heads = heads
            # The single-neuron hook sees this rank's query heads only.
            dms_hooks.install(self.model, decisions, hf.num_hidden_layers,
                              hf.num_attention_heads // self.kvc_tp_size, len(heads))

    def initialize_kv_cache(self, kv_cache_config, *args, **kwargs):
        super().initialize_kv_cache(kv_cache_config, *args, **kwargs)
        step_plan.num_blocks = kv_cache_config.num_blocks
        if self.kvc_settings.method in PREDICTED_METHODS:  # one score per pool row (K and V of one token and head)
            spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
            layers = self.vllm_config.model_config.hf_text_config.num_hidden_layers
            rows = layers * kv_cache_config.num_blocks * spec.num_kv_heads * spec.block_size
            step_plan.score_store = torch.zeros(rows, dtype=torch.float32, device=self.device)

    def execute_model(self, *args, **kwargs):
        step_plan.pages_reports = {}
        try:
            return super().execute_model(*args, **kwargs)
        finally:
            step_plan.rows = None
            step_plan.token_scores.clear()

    def sample_tokens(self, *args, **kwargs):
        output = super().sample_tokens(*args, **kwargs)
        if self.kvc_tp_size > 1 and self.kvc_settings.method in PREDICTED_METHODS:
            self._kvc_agree_pages()
        if step_plan.pages_reports and output is not None:
            # threshold rule (kvzap, dms): the pages each request needs next, for the scheduler
            output.kvc_pages_next = step_plan.pages_reports
        step_plan.pages_reports = {}
        return output

    def _kvc_agree_pages(self) -> None:
        """Survivors differ per rank (each holds its own heads) but the block list is
        shared: every rank, and the scheduler (which hears rank 0 only), use the most
        pages any rank needs. Every rank calls this each step, in batch order."""
        req_ids = list(self.input_batch.req_ids)
        agreed = parallel.agree_max([step_plan.pages_reports.get(req_id, -1) for req_id in req_ids])
        step_plan.pages_reports = {req_id: pages for req_id, pages in zip(req_ids, agreed) if pages >= 0}
        for req_id, pages in step_plan.pages_reports.items():
            if (schedule := self.kvc_schedules.get(req_id)) is not None:
                schedule.pages_next = pages


def _forget(req_id: str) -> None:
    for state in (step_plan.masks, step_plan.stream_tables, step_plan.kept):
        state.pop(req_id, None)


class KVCompressCPUWorker(CPUWorker):
    """Set as ``worker_cls`` by the plugin when an eviction method is configured."""

    def init_device(self) -> None:
        super().init_device()
        runner_cls = type(self.model_runner)
        if getattr(self, "use_v2_model_runner", False):
            raise NotImplementedError("kvcompress eviction supports vLLM's V1 model runner only (CPU default)")
        self.model_runner.__class__ = type(f"KVCompress{runner_cls.__name__}", (EvictionRunnerMixin, runner_cls), {})
        self.model_runner._kvc_setup()
